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
    """Batch sizes that get a graph: every size up to 16, then steps of an eighth (18, 20, ..., 32, 36, ...), and
    `max_batch`. A batch runs padded to its bucket, so padding wastes at most an eighth of a batch's rows, none of a
    small one's (with powers of two, 5 rows ran as 8: a 54 ms step on an H200 where 4 rows took 28 ms, the step
    that kept a fifth live session out; bench/results/realtime_h200.json)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b += max(1, b // 8)
    return [*sizes, max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    cache: PagedKVCache  # its tables are the graph's page inputs
    x: Tensor  # (rows, C, T, h, w) static latents
    t: Tensor | None  # (rows,) static timesteps (denoise only)
    out: Tensor | None  # (rows, 2C, T, h, w) static output (denoise only)
    y: Tensor | None = None  # text models: (rows, L, C_cap) static caption features
    y_mask: Tensor | None = None  # (rows, L) their token masks (padded rows: all valid)

    def load_captions(self, y: Tensor | None, y_mask: Tensor | None) -> None:
        if self.y is None or self.y_mask is None:
            if y is not None:
                raise ValueError("these graphs were captured without captions")
            return
        if y is None or y_mask is None:
            raise ValueError("a text model's forward needs captions")
        n = y.shape[0]
        self.y[:n].copy_(y)
        self.y_mask[:n].copy_(y_mask)


class _GraphSet:
    """Graphs of one forward, keyed by (rows, frames); captured on first use or all at once (`capture_all`).
    Subclasses say which keys exist and what a graph runs; `writes`: the forward stores K/V, so a write is begun
    (on the host, before the capture: nothing host-side may run inside a graph) for it to store into."""

    writes = False

    def __init__(self, model: CausalSTDiT, pool: KVPool, pages: PageManager, latent_shape: tuple[int, ...],
                 max_batch: int, mempool=None, captions: tuple[int, int] | None = None) -> None:  # fmt: skip
        self.model, self.pool, self.pages = model, pool, pages
        self.latent_shape = latent_shape  # (C, T, h, w) of a chunk
        self.captions = captions  # text models: (L, C_cap) of a row's caption features
        self.buckets = batch_buckets(max_batch)
        self.mempool = mempool if mempool is not None else torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def keys(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor, y: Tensor | None,
                y_mask: Tensor | None) -> Tensor | None:  # fmt: skip
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
            y = y_mask = None
            if self.captions is not None:
                y = torch.zeros((rows, *self.captions), dtype=self.pool.temporal.dtype, device=dev)
                y_mask = torch.ones((rows, self.captions[0]), dtype=torch.long, device=dev)
            if self.writes:
                cache.begin_write(frames)  # no streams loaded: every row writes the scratch pages
            try:
                graph, out = capture(lambda: self._record(cache, x, t, y, y_mask), self.mempool)
            finally:
                cache.abort_write()
            self._graphs[key] = _Graph(graph, cache, x, t, out, y, y_mask)
        return self._graphs[key]

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)


class GraphedDenoiser(_GraphSet):
    """`model.denoise` over the paged pool, one graph per batch bucket."""

    def keys(self) -> list[tuple[int, int]]:
        return [(rows, self.latent_shape[1]) for rows in self.buckets]

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor, y: Tensor | None,
                y_mask: Tensor | None) -> Tensor | None:  # fmt: skip
        return self.model.denoise(cache, x, t, y, y_mask)

    def __call__(self, streams: list[StreamPages], x: Tensor, t: Tensor, y: Tensor | None = None,
                 y_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Epsilon | variance (B, 2C, T, h, w) of the chunks x (B, C, T, h, w) at timesteps t (B,) (and captions
        y (B, L, C_cap) with token masks (B, L) for a text model)."""
        n = x.shape[0]
        g = self._get((self._bucket(n), x.shape[2]))
        g.cache.load(streams)
        g.load_captions(y, y_mask)
        g.x[:n].copy_(x)
        g.t[:n].copy_(t)
        g.graph.replay()
        assert g.out is not None
        return g.out[:n].clone()


class GraphedWriter(_GraphSet):
    """`model.write` over the paged pool, one graph per batch bucket and chunk length in `frame_counts`."""

    writes = True

    def __init__(self, model: CausalSTDiT, pool: KVPool, pages: PageManager, latent_shape: tuple[int, ...],
                 max_batch: int, frame_counts: tuple[int, ...], mempool=None,
                 captions: tuple[int, int] | None = None) -> None:  # fmt: skip
        super().__init__(model, pool, pages, latent_shape, max_batch, mempool, captions)
        self.frame_counts = frame_counts

    def keys(self) -> list[tuple[int, int]]:
        return [(rows, frames) for rows in self.buckets for frames in self.frame_counts]

    def _record(self, cache: PagedKVCache, x: Tensor, t: Tensor, y: Tensor | None,
                y_mask: Tensor | None) -> Tensor | None:  # fmt: skip
        self.model.write_kv(cache, x, y, y_mask)
        return None

    def __call__(self, streams: list[StreamPages], x: Tensor, y: Tensor | None = None,
                 y_mask: Tensor | None = None) -> None:  # fmt: skip
        """Write the clean chunks x (B, C, T, h, w) into the streams' caches: plan (may raise OutOfPages,
        nothing written), replay, commit."""
        n = x.shape[0]
        g = self._get((self._bucket(n), x.shape[2]))
        g.cache.load(streams)
        g.cache.begin_write(x.shape[2])
        try:
            g.load_captions(y, y_mask)
            g.x[:n].copy_(x)
            g.graph.replay()
        except BaseException:
            g.cache.abort_write()
            raise
        g.cache.commit_write()
