"""`PagedKVCache`: the model's `KVCache` for a batch of streams over the shared page pool.

Each stream may hold any number of cached frames (0..P_max) and sit at any absolute position; one forward serves
them all. Reads go through the Triton kernels on CUDA (or with TRITON_INTERPRET=1), and through the plain torch
references on the CPU.

The device-side tables (page table, prefix table, cache lengths, positions, write targets) are allocated once, for
`rows` rows, and refilled in place: `load(streams)` points them at a batch of streams (rows beyond the batch read
and write the pool's scratch pages), `begin_write` plans a write and fills in its target pages. A CUDA graph
captured over one of these objects therefore replays against whatever was loaded last, and host-side bookkeeping
never runs inside a graph. Eager callers make one per batch (rows = its streams) and use `model.write`, which
brackets the forward with `begin_write` / `commit_write`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ca2vdm.kernels.paged_prefix_attention import (
    paged_prefix_attention,
    paged_prefix_attention_reference,
    paged_prefix_attention_sdpa,
)
from ca2vdm.kernels.paged_temporal_attention import paged_temporal_attention, paged_temporal_attention_reference
from ca2vdm.kernels.paged_write import paged_write, paged_write_reference
from ca2vdm.server.model.cache import KVCache

from .block_manager import PageManager, StreamPages, WritePlan
from .pool import KVPool


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without a stream synchronisation: a plain `.to("cuda")` from pageable memory
    waits for every kernel queued before it, which would stop the host from preparing the next engine step
    while the GPU runs this one. Staged through pinned memory and copied asynchronously instead."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: Tensor, src: Tensor) -> None:
    """`dst.copy_(src)` for a host tensor `src`, without a stream synchronisation (see `to_device`): how the
    fixed-address tables are refilled."""
    dst.copy_(src.pin_memory() if dst.device.type == "cuda" else src, non_blocking=True)


class PagedKVCache(KVCache):
    """`streams`: the batch to load now; `rows`: the tables' fixed row count (default: one per stream).
    `backend`: "triton" (the paged kernels), "torch" (plain references), "auto" (triton on CUDA, torch on the
    CPU; tests run the kernels on the CPU with backend="triton" under TRITON_INTERPRET=1).
    `prefix_kernel`: with the triton backend, prefix attention runs as gather + SDPA ("sdpa", the default:
    measured faster at 4+ streams) or as the paged Triton kernel ("triton")."""

    def __init__(
        self,
        pool: KVPool,
        manager: PageManager,
        streams: list[StreamPages] | None = None,
        *,
        rows: int | None = None,
        backend: str = "auto",
        prefix_kernel: str = "sdpa",
    ) -> None:
        streams = streams or []
        rows = len(streams) if rows is None else rows
        if rows < 1:
            raise ValueError("a batch needs at least one row")
        self.device = pool.temporal.device
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"unknown backend {backend!r}")
        if prefix_kernel not in ("sdpa", "triton"):
            raise ValueError(f"unknown prefix kernel {prefix_kernel!r}")
        self.pool, self.manager = pool, manager
        self.backend, self.prefix_kernel = backend, prefix_kernel
        self.rows = rows
        self.max_frames = manager.max_frames
        self.prefix_frames = manager.num_prefix
        dev = self.device
        self.page_table = torch.zeros(rows, self.max_frames, dtype=torch.int32, device=dev)
        self.prefix_table = torch.zeros(rows, self.prefix_frames, dtype=torch.int32, device=dev)
        self.cache_lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        self._positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self._targets: dict[int, tuple[Tensor, Tensor]] = {}  # frames per write -> (temporal, prefix) target pages
        self._plan: WritePlan | None = None
        self.streams: list[StreamPages] = []
        self.load(streams)

    # ---- host side: what the tables describe -----------------------------------------------------------

    def load(self, streams: list[StreamPages]) -> None:
        """Point the tables at `streams` (at most `rows`; the other rows get empty queues and scratch pages)."""
        assert self._plan is None, "load during a write"
        assert len(streams) <= self.rows, f"{len(streams)} streams for {self.rows} rows"
        assert all(st.max_frames == self.max_frames for st in streams), "streams of another queue length"
        self.streams = list(streams)
        table = torch.zeros(self.rows, self.max_frames, dtype=torch.int32)
        prefix = torch.full((self.rows, self.prefix_frames), self.pool.scratch_prefix_page, dtype=torch.int32)
        lens = torch.zeros(self.rows, dtype=torch.int32)
        positions = torch.zeros(self.rows, dtype=torch.long)
        for i, st in enumerate(streams):
            table[i, : st.num_cached] = torch.tensor(st.ring, dtype=torch.int32)
            if st.prefix:
                prefix[i] = torch.tensor(st.prefix, dtype=torch.int32)
            lens[i], positions[i] = st.num_cached, st.num_written
        for dst, src in ((self.page_table, table), (self.prefix_table, prefix), (self.cache_lens, lens),
                         (self._positions, positions)):  # fmt: skip
            copy_from_host(dst, src)

    def begin_write(self, num_frames: int) -> None:
        """Plan a write of `num_frames` frames to every loaded stream and fill in the target pages. Raises
        OutOfPages with nothing changed."""
        assert self._plan is None, "a write is already in progress"
        plan = self.manager.plan_write(self.streams, num_frames)
        pad = self.rows - len(self.streams)
        pages = torch.tensor(plan.pages + [[self.pool.scratch_page] * num_frames] * pad, dtype=torch.int32)
        prefix = torch.tensor(plan.prefix_pages + [[self.pool.scratch_prefix_page] * self.prefix_frames] * pad,
                              dtype=torch.int32)  # fmt: skip
        if num_frames not in self._targets:
            self._targets[num_frames] = (
                torch.empty((self.rows, num_frames), dtype=torch.int32, device=self.device),
                torch.empty((self.rows, self.prefix_frames), dtype=torch.int32, device=self.device),
            )
        for dst, src in zip(self._targets[num_frames], (pages, prefix), strict=True):
            copy_from_host(dst, src.view(dst.shape))
        self._plan = plan

    def commit_write(self) -> None:
        assert self._plan is not None, "commit without a write"
        plan, self._plan = self._plan, None
        self.manager.commit_write(self.streams, plan)
        self.load(self.streams)

    def abort_write(self) -> None:
        if self._plan is not None:
            plan, self._plan = self._plan, None
            self.manager.abort_write(plan)

    # ---- KVCache: what the forward calls -----------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.rows

    def positions(self) -> Tensor:
        return self._positions

    def num_cached(self) -> Tensor:
        return self.cache_lens.long()

    def attend_temporal(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        table = self.pool.temporal[layer]
        if self.backend == "torch":
            return paged_temporal_attention_reference(q, k, v, table, self.page_table, self.cache_lens).flatten(-2)
        # written through a (B, S, T) view of a (B, T, S) buffer: the model's layout, so nothing is transposed
        b, s, t, h, d = q.shape
        out = torch.empty((b, t, s, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
        return paged_temporal_attention(q, k, v, table, self.page_table, self.cache_lens, out=out).flatten(-2)

    def attend_prefix(self, layer: int, q: Tensor) -> Tensor:
        assert all(st.prefix for st in self.streams), "prefix K/V read before any frame was written"
        if self.backend == "torch":
            fn = paged_prefix_attention_reference
        else:
            fn = paged_prefix_attention if self.prefix_kernel == "triton" else paged_prefix_attention_sdpa
        return fn(q, self.pool.prefix[layer], self.prefix_table).flatten(-2)

    def store(self, layer: int, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> None:
        assert self._plan is not None, "store outside a write: call begin_write first (model.write does)"
        pages, prefix_pages = self._targets[k.shape[2]]
        write = paged_write if self.backend == "triton" else paged_write_reference
        write(k.transpose(1, 2), v.transpose(1, 2), self.pool.temporal[layer], pages)  # (B, T, S, H, D)
        if self.prefix_frames:
            assert prefix_k is not None and prefix_v is not None
            write(prefix_k, prefix_v, self.pool.prefix[layer], prefix_pages)
