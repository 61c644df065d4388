"""CUDA graphs of the batched denoising forward and of the cache write, one per batch-size bucket.

The eager XL/2 forward launches ~1,100 kernels from Python; replaying a captured graph removes that
launch overhead. A graph needs fixed shapes and fixed addresses, so each bucket owns static inputs (the
latents, timesteps and page tables); a batch is padded up to its bucket with rows that attend to no cached
frame and are discarded. Page tables change between steps (writes, joins), which is why they are inputs
copied into the static buffers before every replay rather than baked into the graph.

A write graph (one per bucket and chunk length: 1 frame for a condition frame, T for a chunk) also takes the
target pages as inputs: the write is planned on the host (`PageManager.plan_write`), its page ids copied in,
the graph replayed, and the plan committed. Padded rows write into a scratch page that no stream owns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.paged_write import paged_write
from server.cache.block_manager import PageManager, StreamPages, WritePlan
from server.cache.paged import PagedKVCache, to_device
from server.cache.pool import KVPool
from server.model.stdit import CausalSTDiT


class _StaticPagedCache(PagedKVCache):
    """A read-only PagedKVCache whose device tables live at fixed addresses (refilled by `load`)."""

    def __init__(self, pool: KVPool, manager: PageManager, rows: int, max_frames: int) -> None:
        dummy = [StreamPages(max_frames) for _ in range(rows)]
        self._rows = rows
        super().__init__(pool, manager, dummy, backend="triton")

    def load(self, streams: list[StreamPages]) -> None:
        self.streams = streams + [StreamPages(self.max_frames) for _ in range(self._rows - len(streams))]
        old = (self.page_table, self.prefix_table, self.cache_lens, self._positions)
        self._refresh()  # builds new tables; copy them into the captured addresses
        for dst, src in zip(old, (self.page_table, self.prefix_table, self.cache_lens, self._positions), strict=True):
            dst.copy_(src)
        self.page_table, self.prefix_table, self.cache_lens, self._positions = old

    def attend_prefix(self, layer: int, q: Tensor) -> Tensor:  # padded rows have no prefix: page 0 stands in
        from kernels.paged_prefix_attention import paged_prefix_attention_sdpa

        return paged_prefix_attention_sdpa(q, self.pool.prefix[layer], self.prefix_table).flatten(-2)

    def store(self, *args, **kwargs) -> None:
        raise AssertionError("the denoising graph's cache is read-only: writes go through GraphedWriter")


class _StaticWriteCache(_StaticPagedCache):
    """The write side: target pages are static inputs too; `commit` is left to the caller (after the replay)."""

    def __init__(self, pool: KVPool, manager: PageManager, rows: int, max_frames: int, frames: int,
                 scratch: tuple[int, int]) -> None:  # fmt: skip
        super().__init__(pool, manager, rows, max_frames)
        self.scratch = scratch  # (temporal page, prefix page) that padded rows write into
        self.new_pages = torch.full((rows, frames), scratch[0], dtype=torch.int32, device=self.device)
        self.new_prefix = torch.full((rows, self.prefix_frames), scratch[1], dtype=torch.int32, device=self.device)

    def load_write(self, streams: list[StreamPages], plan: WritePlan) -> None:
        self.load(streams)
        rows, frames = self.new_pages.shape
        pad = rows - len(streams)
        pages = torch.tensor(plan.pages + [[self.scratch[0]] * frames] * pad, dtype=torch.int32)
        prefix = torch.tensor(plan.prefix_pages + [[self.scratch[1]] * self.prefix_frames] * pad, dtype=torch.int32)
        self.new_pages.copy_(to_device(pages.view(rows, frames), self.device))
        self.new_prefix.copy_(to_device(prefix.view(rows, self.prefix_frames), self.device))

    def store(self, layer: int, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> None:
        paged_write(k.transpose(1, 2), v.transpose(1, 2), self.pool.temporal[layer], self.new_pages)
        if self.prefix_frames:
            assert prefix_k is not None and prefix_v is not None
            paged_write(prefix_k, prefix_v, self.pool.prefix[layer], self.new_prefix)

    def commit(self, num_frames: int) -> None:  # inside the graph: nothing; GraphedWriter commits after replay
        pass


def capture(forward: Callable[[], Tensor | None], mempool) -> tuple[torch.cuda.CUDAGraph, Tensor | None]:
    """Warm up `forward` on a side stream (Triton compilation, cuBLAS handles), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool), torch.no_grad():
        out = forward()
    return graph, out


def _buckets(max_batch: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]


class GraphedWriter:
    """`model.write` over the paged pool as CUDA graphs, per (bucket, frames). The pool must hold one spare
    temporal page and one spare prefix page beyond the manager's (`scratch`)."""

    def __init__(self, model: CausalSTDiT, pool: KVPool, pages: PageManager, max_frames: int,
                 latent_shape: tuple[int, ...], max_batch: int, frame_counts: tuple[int, ...],
                 scratch: tuple[int, int], mempool=None) -> None:  # fmt: skip
        self.model, self.pool, self.pages = model, pool, pages
        self.max_frames, self.latent_shape, self.scratch = max_frames, latent_shape, scratch
        self.buckets = _buckets(max_batch)
        self.frame_counts = frame_counts
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, _StaticWriteCache, Tensor]] = {}
        self.mempool = mempool if mempool is not None else torch.cuda.graph_pool_handle()

    def _capture(self, rows: int, frames: int) -> None:
        cache = _StaticWriteCache(self.pool, self.pages, rows, self.max_frames, frames, self.scratch)
        c, _, h, w = self.latent_shape
        x = torch.zeros((rows, c, frames, h, w), device=self.pool.temporal.device)
        graph, _ = capture(lambda: self.model.write(cache, x), self.mempool)
        self._graphs[(rows, frames)] = (graph, cache, x)

    def capture_all(self) -> None:
        for rows in self.buckets:
            for frames in self.frame_counts:
                if (rows, frames) not in self._graphs:
                    self._capture(rows, frames)

    def __call__(self, streams: list[StreamPages], x: Tensor) -> None:
        """Write the clean chunks x (B, C, T, h, w) into the streams' caches (plan, replay, commit)."""
        n, frames = x.shape[0], x.shape[2]
        rows = next(b for b in self.buckets if b >= n)
        if (rows, frames) not in self._graphs:
            self._capture(rows, frames)
        graph, cache, sx = self._graphs[(rows, frames)]
        plan = self.pages.plan_write(streams, frames)  # may raise OutOfPages: nothing written yet
        cache.load_write(streams, plan)
        sx[:n].copy_(x)
        graph.replay()
        self.pages.commit_write(streams, plan)


class GraphedDenoiser:
    def __init__(
        self,
        model: CausalSTDiT,
        pool: KVPool,
        pages: PageManager,
        max_frames: int,
        latent_shape: tuple[int, ...],
        max_batch: int,
    ) -> None:
        self.model, self.pool, self.pages = model, pool, pages
        self.max_frames, self.latent_shape = max_frames, latent_shape
        self.buckets = _buckets(max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, _StaticPagedCache, Tensor, Tensor, Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle()  # shared with the write graphs: replays never overlap

    def _capture(self, rows: int) -> None:
        dev = self.pool.temporal.device
        cache = _StaticPagedCache(self.pool, self.pages, rows, self.max_frames)
        x = torch.zeros((rows, *self.latent_shape), device=dev)
        t = torch.zeros(rows, dtype=torch.long, device=dev)
        graph, out = capture(lambda: self.model.denoise(cache, x, t), self.mempool)
        assert out is not None
        self._graphs[rows] = (graph, cache, x, t, out)

    def capture_all(self) -> None:
        """Capture every bucket now (server warm-up), so no session pays for a capture."""
        for rows in self.buckets:
            if rows not in self._graphs:
                self._capture(rows)

    def __call__(self, streams: list[StreamPages], x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        rows = next(b for b in self.buckets if b >= n)
        if rows not in self._graphs:
            self._capture(rows)
        graph, cache, sx, st, out = self._graphs[rows]
        cache.load(streams)
        sx[:n].copy_(x)
        st[:n].copy_(t)
        graph.replay()
        return out[:n].clone()
