"""Paged caches filled with random frames: the state a benchmark times a forward against."""

from __future__ import annotations

import torch

from ca2vdm.server.cache.block_manager import PageManager
from ca2vdm.server.cache.paged import PagedKVCache
from ca2vdm.server.cache.pool import KVPool
from ca2vdm.server.model.loader import Pipeline


def paged_pool(pipe: Pipeline, num_sessions: int) -> tuple[KVPool, PageManager]:
    """A pool for `num_sessions` full queues of the pipeline's model (in its dtype), and the pool's page manager."""
    cfg = pipe.config
    dtype = next(pipe.model.parameters()).dtype
    pool = KVPool.for_sessions(cfg.model, num_sessions, cfg.max_cache_frames, pipe.device, dtype)
    return pool, PageManager(pool.num_pages, pool.num_prefix_pages, cfg.model.prefix_frames, cfg.max_cache_frames)


def filled_cache(pipe: Pipeline, pool: KVPool, pages: PageManager, num_streams: int, num_frames: int) -> PagedKVCache:
    """`num_streams` new streams that have written a condition frame and then chunks of random latents until at
    least `num_frames` frames (a queue of `max_cache_frames` is full, every later one has dequeued)."""
    cfg = pipe.config
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    cache = PagedKVCache(pool, pages, [pages.new_stream() for _ in range(num_streams)])
    pipe.model.write(cache, torch.randn(num_streams, c, 1, h, w, device=pipe.device))
    while cache.streams[0].num_written < num_frames:
        pipe.model.write(cache, torch.randn(num_streams, c, cfg.chunk_frames, h, w, device=pipe.device))
    return cache
