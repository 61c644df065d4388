"""CUDA graphs of the batched denoising forward and of the cache write, one per batch-size bucket.

The eager XL/2 forward launches ~1,100 kernels from Python; replaying a captured graph removes that launch
overhead. A graph needs fixed shapes and fixed addresses, so each graph owns static inputs (latents, timesteps) and
its own `PagedKVCache`, whose tables sit at fixed addresses and are refilled before every replay (`load`, and
`begin_write` for a write's target pages): page tables change between steps (writes, joins). A batch is padded up
to its bucket with rows that read an empty queue and write the pool's scratch page; their outputs are discarded.

A write graph (one per bucket and chunk length: 1 frame for a condition frame, T for a chunk) captures
`CausalSTDiT.write_kv`, the forward alone; planning and committing the write stay on the host around the replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ca2vdm.server.cache.block_manager import PageManager, StreamPages
from ca2vdm.server.cache.paged import PagedKVCache
from ca2vdm.server.cache.pool import KVPool
from ca2vdm.server.model.stdit import CausalSTDiT


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


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below `max_batch`, and `max_batch`."""
    return [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    cache: PagedKVCache  # its tables are the graph's page inputs
    x: Tensor  # (rows, C, T, h, w) static latents
    t: Tensor | None  # (rows,) static timesteps (denoise only)
    out: Tensor | None  # (rows, 2C, T, h, w) static output (denoise only)


class _GraphSet:
    """Graphs of one forward, keyed by (rows, frames); captured on first use or all at once (`capture_all`).
    Subclasses say which keys exist and what a graph runs; `writes`: the forward stores K/V, so a write is begun
    (on the host, before the capture: nothing host-side may run inside a graph) for it to store into."""

    writes = False

    def __init__(self, model: CausalSTDiT, pool: KVPool, pages: PageManager, latent_shape: tuple[int, ...],
                 max_batch: int, mempool=None) -> None:  # fmt: skip
        self.model, self.pool, self.pages = model, pool, pages
        self.latent_shape = latent_shape  # (C, T, h, w) of a chunk
        self.buckets = batch_buckets(max_batch)
        self.mempool = mempool if mempool is not None else torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def keys(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor) -> Tensor | None:
        """The captured work: a forward over `cache` and the static inputs."""
        raise NotImplementedError

    def capture_all(self) -> None:
        """Capture every graph now (server warm-up), so no session pays for a capture."""
        for key in self.keys():
            self._get(key)

    def _get(self, key: tuple[int, int]) -> _Graph:
        if key not in self._graphs:
            rows, frames = key
            c, _, h, w = self.latent_shape
            dev = self.pool.temporal.device
            cache = PagedKVCache(self.pool, self.pages, rows=rows, backend="triton")
            x = torch.zeros((rows, c, frames, h, w), device=dev)
            t = torch.zeros(rows, dtype=torch.long, device=dev)
            if self.writes:
                cache.begin_write(frames)  # no streams loaded: every row writes the scratch pages
            try:
                graph, out = capture(lambda: self._record(cache, x, t), self.mempool)
            finally:
                cache.abort_write()
            self._graphs[key] = _Graph(graph, cache, x, t, out)
        return self._graphs[key]

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)


class GraphedDenoiser(_GraphSet):
    """`model.denoise` over the paged pool, one graph per batch bucket."""

    def keys(self) -> list[tuple[int, int]]:
        return [(rows, self.latent_shape[1]) for rows in self.buckets]

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor) -> Tensor | None:
        return self.model.denoise(cache, x, t)

    def __call__(self, streams: list[StreamPages], x: Tensor, t: Tensor) -> Tensor:
        """Epsilon | variance (B, 2C, T, h, w) of the chunks x (B, C, T, h, w) at timesteps t (B,)."""
        n = x.shape[0]
        g = self._get((self._bucket(n), x.shape[2]))
        g.cache.load(streams)
        g.x[:n].copy_(x)
        g.t[:n].copy_(t)
        g.graph.replay()
        assert g.out is not None
        return g.out[:n].clone()


class GraphedWriter(_GraphSet):
    """`model.write` over the paged pool, one graph per batch bucket and chunk length in `frame_counts`."""

    writes = True

    def __init__(self, model: CausalSTDiT, pool: KVPool, pages: PageManager, latent_shape: tuple[int, ...],
                 max_batch: int, frame_counts: tuple[int, ...], mempool=None) -> None:  # fmt: skip
        super().__init__(model, pool, pages, latent_shape, max_batch, mempool)
        self.frame_counts = frame_counts

    def keys(self) -> list[tuple[int, int]]:
        return [(rows, frames) for rows in self.buckets for frames in self.frame_counts]

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor) -> Tensor | None:
        self.model.write_kv(cache, x)
        return None

    def __call__(self, streams: list[StreamPages], x: Tensor) -> None:
        """Write the clean chunks x (B, C, T, h, w) into the streams' caches: plan (may raise OutOfPages,
        nothing written), replay, commit."""
        n = x.shape[0]
        g = self._get((self._bucket(n), x.shape[2]))
        g.cache.load(streams)
        g.cache.begin_write(x.shape[2])
        try:
            g.x[:n].copy_(x)
            g.graph.replay()
        except BaseException:
            g.cache.abort_write()
            raise
        g.cache.commit_write()
