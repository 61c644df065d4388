"""CPU bookkeeping of the paged K/V pool: free lists, reference counts, and each stream's page ring.

No tensors here. A page holds one frame's K/V for every layer (see `server/cache/pool.py` for why), so
one page id per frame serves all layers. Two id spaces exist: temporal pages (the queue of conditional
frames) and prefix pages (the prefix-enhanced attention's K/V of a stream's last P frames).

Written pages are immutable while shared: a stream overwrites a page in place only when it is the page's
sole owner (reference count 1) and the page is leaving its queue; otherwise it takes a fresh page. So
forks and shared first frames need no copy-on-write.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class OutOfPages(RuntimeError):
    """The pool has too few free pages for a request; a normal, reportable condition."""


class BlockManager:
    """Free list and reference counts over page ids 0..num_pages-1."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError("num_pages must be >= 0")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with reference count 1, or OutOfPages (nothing allocated)."""
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            assert self._refs[p] > 0, f"incref of free page {p}"
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages reaching zero return to the free list."""
        for p in pages:
            assert self._refs[p] > 0, f"double free of page {p}"
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


@dataclass
class StreamPages:
    """One stream's pages: the queue as a ring (frame n sits in slot n % max_frames) and its prefix pages."""

    max_frames: int
    ring: list[int] = field(default_factory=list)  # grows to max_frames, then slots are replaced
    num_written: int = 0  # frames written so far (the next frame's absolute index)
    prefix: list[int] = field(default_factory=list)  # prefix page per prefix slot ([] before any write)

    @property
    def num_cached(self) -> int:
        return len(self.ring)


@dataclass
class WritePlan:
    """Pages a pending write of `num_frames` frames per stream goes to, and what it releases on commit."""

    num_frames: int
    pages: list[list[int]]  # per stream: target page of each new frame
    prefix_pages: list[list[int]]  # per stream: target page of each prefix slot
    released: list[int]  # temporal pages to drop a reference from at commit
    released_prefix: list[int]


def _target_page(bm: BlockManager, old: int | None, released: list[int], fresh: list[int]) -> int:
    """The page for an entry that replaces `old`: `old` itself when the stream owns it alone (overwritten in
    place), else a fresh page (`old`, if any, is released at commit)."""
    if old is not None and bm.refcount(old) == 1:
        return old
    if old is not None:
        released.append(old)
    page = bm.allocate(1)[0]
    fresh.append(page)
    return page


class PageManager:
    """Allocation policy over the two id spaces; streams are plain `StreamPages` records."""

    def __init__(self, num_pages: int, num_prefix_pages: int, num_prefix: int) -> None:
        self.temporal = BlockManager(num_pages)
        self.prefix = BlockManager(num_prefix_pages)
        self.num_prefix = num_prefix

    def new_stream(self, max_frames: int) -> StreamPages:
        return StreamPages(max_frames=max_frames)

    def fork(self, stream: StreamPages) -> StreamPages:
        """A second stream continuing from the same point; shares every page."""
        self.temporal.incref(stream.ring)
        self.prefix.incref(stream.prefix)
        return StreamPages(stream.max_frames, list(stream.ring), stream.num_written, list(stream.prefix))

    def release(self, stream: StreamPages) -> None:
        """Give back all of a stream's pages (cancel, disconnect, finish)."""
        self.temporal.free(stream.ring)
        self.prefix.free(stream.prefix)
        stream.ring, stream.prefix = [], []

    def plan_write(self, streams: list[StreamPages], num_frames: int) -> WritePlan:
        """Choose target pages for a write of `num_frames` frames to each stream, allocating what is
        needed. Raises OutOfPages with nothing allocated."""
        plan = WritePlan(num_frames, [], [], [], [])
        fresh_t: list[int] = []
        fresh_p: list[int] = []
        try:
            for st in streams:
                assert num_frames <= st.max_frames, "a chunk longer than the cache queue"
                targets = []
                for i in range(num_frames):
                    n = st.num_written + i
                    old = st.ring[n % st.max_frames] if n >= st.max_frames else None
                    targets.append(_target_page(self.temporal, old, plan.released, fresh_t))
                plan.pages.append(targets)
                ptargets = [
                    _target_page(self.prefix, st.prefix[slot] if st.prefix else None, plan.released_prefix, fresh_p)
                    for slot in range(self.num_prefix)
                ]
                plan.prefix_pages.append(ptargets)
        except OutOfPages:
            self.temporal.free(fresh_t)
            self.prefix.free(fresh_p)
            raise
        return plan

    def commit_write(self, streams: list[StreamPages], plan: WritePlan) -> None:
        for st, targets, ptargets in zip(streams, plan.pages, plan.prefix_pages, strict=True):
            for i, page in enumerate(targets):
                n = st.num_written + i
                if n < st.max_frames:
                    st.ring.append(page)
                else:
                    st.ring[n % st.max_frames] = page
            st.num_written += plan.num_frames
            st.prefix = ptargets
        self.temporal.free(plan.released)
        self.prefix.free(plan.released_prefix)


class FirstFrameIndex:
    """Shares first frames: streams started from the same condition image, seed and prefix perturbation
    write identical first-frame K/V, so a later one forks the pages of an earlier one instead of running
    the write. Each entry holds one reference to its pages; least recently used entries are dropped past
    `capacity`, and `evict` frees them when the pool runs short.
    """

    def __init__(self, manager: PageManager, capacity: int = 64) -> None:
        from collections import OrderedDict

        self.manager = manager
        self.capacity = capacity
        self._entries: OrderedDict[object, StreamPages] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: object) -> StreamPages | None:
        """A new stream sharing the cached first frame of `key`, or None."""
        template = self._entries.get(key)
        if template is None:
            return None
        self._entries.move_to_end(key)
        return self.manager.fork(template)

    def insert(self, key: object, stream: StreamPages) -> None:
        """Remember `stream` (which has written exactly its first frame) under `key`."""
        assert stream.num_written == 1, "only a stream holding just its first frame can be shared"
        if key in self._entries:
            return
        self._entries[key] = self.manager.fork(stream)
        while len(self._entries) > self.capacity:
            self.manager.release(self._entries.popitem(last=False)[1])

    def evict(self, num_entries: int | None = None) -> int:
        """Release the `num_entries` least recently used entries (all by default); returns how many."""
        n = len(self._entries) if num_entries is None else min(num_entries, len(self._entries))
        for _ in range(n):
            self.manager.release(self._entries.popitem(last=False)[1])
        return n
