"""CPU bookkeeping of the paged K/V pool: free lists and each stream's page ring.

No tensors here. A page holds one frame's K/V for every layer (see `server/cache/pool.py` for why), so one page id
per frame serves all layers. Two id spaces exist: temporal pages (the queue of conditional frames) and prefix pages
(the prefix-enhanced attention's K/V of a stream's last P frames).

Every page belongs to exactly one stream. A stream's queue is a ring: once full, a write puts frame n on the page of
frame n - max_frames, which is leaving the queue, so dequeuing copies nothing and a stream never holds more than
`max_frames` temporal pages and `num_prefix` prefix pages. A write is transactional: `plan_write` picks (and, for a
growing queue, allocates) every target page or raises OutOfPages having changed nothing; the caller runs the forward
that fills the pages, then `commit_write`, or `abort_write` if the forward failed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class OutOfPages(RuntimeError):
    """The pool has too few free pages for a request; a normal, reportable condition."""


class BlockManager:
    """Free list over page ids 0..num_pages-1."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError("num_pages must be >= 0")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._used = [False] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_used(self, page: int) -> bool:
        return self._used[page]

    def allocate(self, n: int) -> list[int]:
        """n free pages, or OutOfPages (nothing allocated)."""
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._used[p] = True
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert self._used[p], f"double free of page {p}"
            self._used[p] = False
            self._free.append(p)


@dataclass
class StreamPages:
    """One stream's pages: the queue as a ring (frame n sits in slot (n - base) % max_frames) and its prefix pages.

    `base` is the absolute index of the stream's first written frame: 0, or for a stream rebuilt from a kept
    history (a resumed session) the index of the oldest frame it kept, so that positions go on counting."""

    max_frames: int
    ring: list[int] = field(default_factory=list)  # grows to max_frames, then slots are replaced
    num_written: int = 0  # frames written so far (the next frame's absolute index)
    prefix: list[int] = field(default_factory=list)  # prefix page per prefix slot ([] before any write)
    base: int = 0

    @property
    def num_cached(self) -> int:
        return len(self.ring)


@dataclass
class WritePlan:
    """Where a pending write of `num_frames` frames per stream goes, and which of those pages it allocated."""

    num_frames: int
    pages: list[list[int]] = field(default_factory=list)  # per stream: target page of each new frame
    prefix_pages: list[list[int]] = field(default_factory=list)  # per stream: target page of each prefix slot
    fresh: list[int] = field(default_factory=list)  # temporal pages allocated for this write (freed on abort)
    fresh_prefix: list[int] = field(default_factory=list)


class PageManager:
    """Allocation policy over the two id spaces for streams of at most `max_frames` cached frames."""

    def __init__(self, num_pages: int, num_prefix_pages: int, num_prefix: int, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.temporal = BlockManager(num_pages)
        self.prefix = BlockManager(num_prefix_pages)
        self.num_prefix = num_prefix
        self.max_frames = max_frames

    def new_stream(self, first_frame: int = 0) -> StreamPages:
        """An empty stream whose first write holds frame `first_frame` (a rebuilt stream: not 0)."""
        return StreamPages(max_frames=self.max_frames, num_written=first_frame, base=first_frame)

    def release(self, stream: StreamPages) -> None:
        """Give back all of a stream's pages (cancel, disconnect, finish)."""
        self.temporal.free(stream.ring)
        self.prefix.free(stream.prefix)
        stream.ring, stream.prefix = [], []

    def plan_write(self, streams: list[StreamPages], num_frames: int) -> WritePlan:
        """Target pages for a write of `num_frames` frames to each stream: pages of dequeued frames are reused in
        place, a queue that is still growing gets fresh ones. Raises OutOfPages with nothing allocated."""
        assert num_frames <= self.max_frames, "a chunk longer than the cache queue"
        plan = WritePlan(num_frames)
        try:
            for st in streams:
                written = st.num_written - st.base
                grow = max(0, min(written + num_frames, self.max_frames) - written)
                fresh = self.temporal.allocate(grow)
                plan.fresh += fresh
                fresh_iter = iter(fresh)
                plan.pages.append([
                    st.ring[n % self.max_frames] if n >= self.max_frames else next(fresh_iter)
                    for n in range(written, written + num_frames)
                ])  # fmt: skip
                prefix = st.prefix or self.prefix.allocate(self.num_prefix)
                if not st.prefix:
                    plan.fresh_prefix += prefix
                plan.prefix_pages.append(list(prefix))
        except OutOfPages:
            self.abort_write(plan)
            raise
        return plan

    def commit_write(self, streams: list[StreamPages], plan: WritePlan) -> None:
        """The write's pages now hold its frames: extend (or rotate) each ring."""
        assert len(streams) == len(plan.pages), "a plan for other streams"
        for st, targets, prefix in zip(streams, plan.pages, plan.prefix_pages, strict=True):
            for i, page in enumerate(targets):
                n = st.num_written - st.base + i
                if n < self.max_frames:
                    st.ring.append(page)
                else:
                    assert st.ring[n % self.max_frames] == page
            st.num_written += plan.num_frames
            st.prefix = prefix

    def abort_write(self, plan: WritePlan) -> None:
        """The write did not happen: free what it allocated; the rings stay as they were. A forward that failed
        midway may have overwritten part of the pages it reuses in place, so the caller ends those streams."""
        self.temporal.free(plan.fresh)
        self.prefix.free(plan.fresh_prefix)
        plan.fresh, plan.fresh_prefix = [], []
