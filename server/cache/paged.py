"""`PagedKVCache`: the model's `KVCache` for a batch of streams over the shared page pool.

Each stream may hold any number of cached frames (0..P_max) and sit at any absolute position; one
forward serves them all. Reads go through the Triton kernels on CUDA (or with TRITON_INTERPRET=1), and
through the plain torch references on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.paged_prefix_attention import (
    paged_prefix_attention,
    paged_prefix_attention_reference,
    paged_prefix_attention_sdpa,
)
from kernels.paged_temporal_attention import paged_temporal_attention, paged_temporal_attention_reference
from kernels.paged_write import paged_write, paged_write_reference
from server.model.cache import KVCache

from .block_manager import PageManager, StreamPages, WritePlan
from .pool import KVPool


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without a stream synchronisation: a plain `.to("cuda")` from pageable memory
    waits for every kernel queued before it, which would stop the host from preparing the next engine step
    while the GPU runs this one. Staged through pinned memory and copied asynchronously instead."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PagedKVCache(KVCache):
    """`backend`: "triton" (the paged kernels), "torch" (plain references), "auto" (triton on CUDA, torch on
    the CPU; tests run the kernels on the CPU with backend="triton" under TRITON_INTERPRET=1).
    `prefix_kernel`: with the triton backend, prefix attention runs as gather + SDPA ("sdpa", the default:
    measured faster at 4+ streams) or as the paged Triton kernel ("triton")."""

    def __init__(
        self,
        pool: KVPool,
        manager: PageManager,
        streams: list[StreamPages],
        backend: str = "auto",
        prefix_kernel: str = "sdpa",
    ) -> None:
        if not streams:
            raise ValueError("a batch needs at least one stream")
        max_frames = {st.max_frames for st in streams}
        if len(max_frames) != 1:
            raise ValueError("streams in one batch must share max_frames")
        self.pool, self.manager, self.streams = pool, manager, streams
        self.max_frames = max_frames.pop()
        self.prefix_frames = manager.num_prefix
        self.device = pool.temporal.device
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"unknown backend {backend!r}")
        if prefix_kernel not in ("sdpa", "triton"):
            raise ValueError(f"unknown prefix kernel {prefix_kernel!r}")
        self.backend = backend
        self.prefix_kernel = prefix_kernel
        self._plan: WritePlan | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Device copies of the page tables (one host-to-device copy per batch state change)."""
        b = len(self.streams)
        table = torch.zeros(b, self.max_frames, dtype=torch.int32)
        prefix = torch.zeros(b, self.prefix_frames, dtype=torch.int32)
        for i, st in enumerate(self.streams):
            table[i, : st.num_cached] = torch.tensor(st.ring, dtype=torch.int32)
            if st.prefix:
                prefix[i] = torch.tensor(st.prefix, dtype=torch.int32)
        self.page_table = to_device(table, self.device)
        self.prefix_table = to_device(prefix, self.device)
        lens = torch.tensor([st.num_cached for st in self.streams], dtype=torch.int32)
        self.cache_lens = to_device(lens, self.device)
        self._positions = to_device(torch.tensor([st.num_written for st in self.streams]), self.device)

    # ---- KVCache ----------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.streams)

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
        if self._plan is None:  # first layer of a write: choose pages (may raise OutOfPages, nothing written)
            self._plan = self.manager.plan_write(self.streams, k.shape[2])
            self._new_pages = to_device(torch.tensor(self._plan.pages, dtype=torch.int32), self.device)
            self._new_prefix = to_device(torch.tensor(self._plan.prefix_pages, dtype=torch.int32), self.device)
        write = paged_write if self.backend == "triton" else paged_write_reference
        write(k.transpose(1, 2), v.transpose(1, 2), self.pool.temporal[layer], self._new_pages)  # (B, T, S, H, D)
        if self.prefix_frames:
            assert prefix_k is not None and prefix_v is not None
            write(prefix_k, prefix_v, self.pool.prefix[layer], self._new_prefix)

    def commit(self, num_frames: int) -> None:
        assert self._plan is not None and self._plan.num_frames == num_frames, "commit without a matching write"
        self.manager.commit_write(self.streams, self._plan)
        self._plan = None
        self._refresh()
