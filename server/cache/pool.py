"""The paged K/V pool: GPU tensors allocated once, handed to each layer as a view.

Page = one frame's K/V for every layer. Tensors are laid out (depth, num_pages, 2, S, H, D), so layer l's
view `temporal[l]` is a contiguous (num_pages, 2, S, H, D) array the kernels index by page id. Why a frame:
- the frame is the unit Ca2-VDM writes (a chunk is T frames), dequeues (oldest frame first) and shares
  (a first frame, a fork point); no page is ever partly used, so there is no fragmentation;
- one page id per frame serves all depth layers: the page table is built once per forward, not per layer;
- a frame's K/V at one layer is S*H*D*2 values (1.2 MB for XL/2 in bf16): large enough that reading it is
  bandwidth-efficient, small enough that 25-frame queues waste nothing.
Prefix-enhanced attention K/V (the last P frames of a stream) have the same shape and their own id space,
so a stream holds exactly P prefix pages instead of prefix K/V for every queued frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ca2vdm.server.model.config import ModelConfig


class KVPool:
    """`num_pages` temporal and `num_prefix_pages` prefix pages that streams own, plus one scratch page of each kind
    (ids `num_pages` and `num_prefix_pages`) that no stream owns: rows that pad a batch up to a CUDA graph's size
    write there and read from there."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        num_prefix_pages: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (cfg.depth, num_pages + 1, 2, cfg.num_spatial, cfg.num_heads, cfg.head_dim)
        pshape = (cfg.depth, num_prefix_pages + 1, 2, cfg.num_spatial, cfg.num_heads, cfg.head_dim)
        self.temporal: Tensor = torch.empty(shape, device=device, dtype=dtype)
        self.prefix: Tensor = torch.empty(pshape, device=device, dtype=dtype)
        self.num_pages = num_pages
        self.num_prefix_pages = num_prefix_pages
        self.scratch_page, self.scratch_prefix_page = num_pages, num_prefix_pages

    @staticmethod
    def page_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of one page (one frame, all layers, K and V)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.depth * 2 * cfg.num_spatial * cfg.hidden_size * elem

    @classmethod
    def for_sessions(
        cls, cfg: ModelConfig, num_sessions: int, max_frames: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVPool:
        """Room for `num_sessions` streams with full queues (max_frames + prefix_frames pages each)."""
        return cls(cfg, num_sessions * max_frames, num_sessions * max(cfg.prefix_frames, 1), device, dtype)

    @classmethod
    def for_budget(
        cls, cfg: ModelConfig, budget_bytes: int, max_frames: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVPool:
        """As many whole sessions as `budget_bytes` holds (e.g. free GPU memory after warm-up)."""
        per_session = (max_frames + max(cfg.prefix_frames, 1)) * cls.page_bytes(cfg, dtype)
        sessions = budget_bytes // per_session
        if sessions < 1:
            raise ValueError(f"a budget of {budget_bytes} bytes holds no session ({per_session} bytes each)")
        return cls.for_sessions(cfg, int(sessions), max_frames, device, dtype)

    @property
    def nbytes(self) -> int:
        return self.temporal.nbytes + self.prefix.nbytes
