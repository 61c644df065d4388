"""The conditional-frame cache that the model reads and extends, kept outside the module.

Ca2-VDM's temporal attention is causal, so once a chunk is finished its frames' K/V never change: they
are computed once, by one t=0 forward over the clean chunk (`CausalSTDiT.write`), and every denoising
step of every later chunk reads them (`CausalSTDiT.denoise`). The cache is a queue of at most P_max frames
per stream; writing past P_max drops the oldest frames.

Two things are cached per block:
- temporal K/V of every queued frame, taken as the reference takes them: from the temporal branch input
  after the cyclic temporal position embedding and the mask-channel merge;
- prefix K/V: the prefix-enhanced spatial attention's K/V of the last `prefix_frames` frames of the most
  recently written chunk (replaced, not queued).

The order of cached frames inside the queue is irrelevant: every query sees every cached frame, and
positions live in the K/V already (the TPE was added before projection). Backends may therefore store the
queue as a ring without moving data when it wraps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .layers import attention, chunk_causal_mask


class KVCache(ABC):
    """Contract between the model and a cache backend, for a batch of B streams.

    - `positions()` gives each stream's absolute index of the next frame to be written (it keeps counting
      past P_max and drives the cyclic TPE).
    - A write is a transaction around one forward: `begin_write(T)` plans it (it may refuse, e.g. when pages run
      out, having changed nothing); the forward calls, for each block in order, `attend_temporal` (the chunk's
      K/V are passed in and are NOT yet in the cache) and then `store`; then `commit_write()` makes the frames
      part of the queue, or `abort_write()` drops the write if the forward failed. `store` may write into the
      backend's memory immediately: later blocks never read an earlier block's entries. Keeping the bookkeeping
      outside the forward is what lets a CUDA graph capture the forward alone (`CausalSTDiT.write_kv`).
    - A denoise forward calls `attend_temporal` and `attend_prefix` and never changes the cache.
    """

    max_frames: int
    prefix_frames: int

    @property
    @abstractmethod
    def batch_size(self) -> int: ...

    @abstractmethod
    def positions(self) -> Tensor:
        """(B,) long: frames written so far per stream (the absolute index of the next frame)."""

    @abstractmethod
    def num_cached(self) -> Tensor:
        """(B,) long: frames currently in each stream's queue (<= max_frames)."""

    @abstractmethod
    def attend_temporal(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Chunk q/k/v (B, S, T, H, D) -> (B, S, T, H*D).

        Each query attends to all cached frames of its stream at the same spatial position and to the
        chunk's frames up to and including its own.
        """

    @abstractmethod
    def attend_prefix(self, layer: int, q: Tensor) -> Tensor:
        """Queries (B, N, H, D) of noisy tokens -> (B, N, H*D) over the stream's cached prefix K/V."""

    @abstractmethod
    def store(self, layer: int, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> None:
        """Record a clean chunk's temporal K/V (B, S, T, H, D) and prefix K/V (B, P, S, H, D) for `layer`."""

    @abstractmethod
    def begin_write(self, num_frames: int) -> None:
        """Prepare to append `num_frames` frames to every stream; raises (changing nothing) if it cannot."""

    @abstractmethod
    def commit_write(self) -> None:
        """Finish the write: advance positions, dequeue the oldest frames beyond capacity."""

    @abstractmethod
    def abort_write(self) -> None:
        """Drop a write that was begun (its forward failed); a no-op when none is in progress."""


class DenseKVCache(KVCache):
    """Contiguous per-model cache for B streams that advance in lockstep (the reference's setting).

    Temporal K/V live in a ring of `max_frames` slots: frame n of a stream sits in slot n % max_frames,
    so dequeuing is free (the slot is simply overwritten). Storage per tensor: (depth, B, S, P_max, H, D),
    laid out so that (B, S) flatten into the attention batch without a copy.
    """

    def __init__(
        self,
        *,
        depth: int,
        batch_size: int,
        num_spatial: int,
        num_heads: int,
        head_dim: int,
        max_frames: int,
        prefix_frames: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        self.max_frames = max_frames
        self.prefix_frames = prefix_frames
        self._batch = batch_size
        shape = (depth, batch_size, num_spatial, max_frames, num_heads, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        pshape = (depth, batch_size, prefix_frames * num_spatial, num_heads, head_dim)
        self.prefix_k = torch.empty(pshape, device=device, dtype=dtype) if prefix_frames else None
        self.prefix_v = torch.empty(pshape, device=device, dtype=dtype) if prefix_frames else None
        self.num_written = 0  # frames written per stream (same for all streams)
        self._writing: int | None = None  # frames of the write in progress

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_frames: int) -> DenseKVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(
            depth=cfg.depth,
            batch_size=batch_size,
            num_spatial=cfg.num_spatial,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            max_frames=max_frames,
            prefix_frames=cfg.prefix_frames,
            device=p.device,
            dtype=p.dtype,
        )

    @property
    def batch_size(self) -> int:
        return self._batch

    def positions(self) -> Tensor:
        return torch.full((self._batch,), self.num_written, dtype=torch.long, device=self.k.device)

    def num_cached(self) -> Tensor:
        return torch.full((self._batch,), self._valid(), dtype=torch.long, device=self.k.device)

    def _valid(self) -> int:
        return min(self.num_written, self.max_frames)

    def attend_temporal(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, s, t, h, d = q.shape
        n = self._valid()
        # Slots [0, n) hold the queue once it has wrapped, and the first n frames before it has.
        keys = torch.cat([self.k[layer, :, :, :n], k], dim=2).flatten(0, 1)  # (B*S, n+T, H, D)
        vals = torch.cat([self.v[layer, :, :, :n], v], dim=2).flatten(0, 1)
        mask = chunk_causal_mask(n, t, q.device)  # (T, n+T)
        out = attention(q.flatten(0, 1), keys, vals, mask)  # (B*S, T, H*D)
        return out.view(b, s, t, h * d)

    def attend_prefix(self, layer: int, q: Tensor) -> Tensor:
        assert self.prefix_k is not None and self.prefix_v is not None, "model has no prefix attention"
        assert self.num_written > 0, "prefix K/V read before any frame was written"
        return attention(q, self.prefix_k[layer], self.prefix_v[layer])

    def begin_write(self, num_frames: int) -> None:
        assert self._writing is None, "a write is already in progress"
        if num_frames > self.max_frames:
            raise ValueError(f"chunk of {num_frames} frames exceeds the cache length {self.max_frames}")
        self._writing = num_frames

    def commit_write(self) -> None:
        assert self._writing is not None, "commit without a write"
        self.num_written += self._writing
        self._writing = None

    def abort_write(self) -> None:
        self._writing = None

    def store(self, layer: int, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> None:
        t = k.shape[2]
        assert self._writing == t, "store outside a write of this length: call begin_write first (model.write does)"
        slots = [(self.num_written + i) % self.max_frames for i in range(t)]
        if slots == list(range(slots[0], slots[0] + t)):
            self.k[layer, :, :, slots[0] : slots[0] + t] = k
            self.v[layer, :, :, slots[0] : slots[0] + t] = v
        else:
            idx = torch.tensor(slots, device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
        if self.prefix_k is not None:
            assert prefix_k is not None and prefix_v is not None
            self.prefix_k[layer] = prefix_k.flatten(1, 2)
            self.prefix_v[layer] = prefix_v.flatten(1, 2)
