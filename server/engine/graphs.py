"""CUDA graphs of the batched denoising forward, one per batch-size bucket.

The eager XL/2 forward launches ~1,100 kernels from Python; replaying a captured graph removes that
launch overhead. A graph needs fixed shapes and fixed addresses, so each bucket owns static inputs (the
latents, timesteps and page tables); a batch is padded up to its bucket with rows that attend to no cached
frame and are discarded. Page tables change between steps (writes, joins), which is why they are inputs
copied into the static buffers before every replay rather than baked into the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.cache.block_manager import PageManager, StreamPages
from server.cache.paged import PagedKVCache
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
        raise AssertionError("a graphed cache is read-only: writes run eagerly")


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
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, _StaticPagedCache, Tensor, Tensor, Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle()

    def _capture(self, rows: int) -> None:
        dev = self.pool.temporal.device
        cache = _StaticPagedCache(self.pool, self.pages, rows, self.max_frames)
        x = torch.zeros((rows, *self.latent_shape), device=dev)
        t = torch.zeros(rows, dtype=torch.long, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up: Triton compilation, cuDNN/cuBLAS handles
                self.model.denoise(cache, x, t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool), torch.no_grad():
            out = self.model.denoise(cache, x, t)
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
