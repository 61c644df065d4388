"""A streaming session as the scheduler sees it: what the client asked for, where it stands, what it has produced.

Lifecycle: WAITING (queued for admission) -> PREFILLING (admitted: the condition frame goes into the cache)
-> GENERATING (denoising chunk after chunk; PAUSED while its consumer is too far behind) -> COMPLETED |
CANCELLED | FAILED. The scheduler reads and sets `state`. No tensors here: the runner keeps each session's device
state (pages, latents, generator) in its own record (`runner.GenerationState`), created at prefill.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ca2vdm.server.media import FORMATS
from ca2vdm.server.model.diffusion import DEFAULT_STEPS, SAMPLERS


class SessionState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    GENERATING = "generating"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (SessionState.COMPLETED, SessionState.CANCELLED, SessionState.FAILED)


@dataclass(frozen=True)
class SessionParams:
    """A validated generation request. `image` is (H, W, 3) uint8 at the model's frame size, or None."""

    image: Tensor | None = None
    seed: int = 0
    sampler: str = "ddim"
    steps: int = DEFAULT_STEPS["ddim"]
    num_frames: int | None = None  # None: until cancelled
    format: str = "raw"  # "raw" (frames only) or one of media.FORMATS

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {SAMPLERS}")
        if not 1 <= self.steps <= 1000:
            raise ValueError("steps must be in [1, 1000]")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError("num_frames must be >= 1 or None")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        if self.format != "raw" and self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose from {('raw', *FORMATS)}")
        if self.image is not None and (self.image.dtype != torch.uint8 or self.image.dim() != 3):
            raise ValueError("image must be a (H, W, 3) uint8 tensor")


@dataclass
class Clip:
    """One finished chunk of a stream."""

    index: int
    first_frame: int
    frames: Tensor  # (n, H, W, 3) uint8 on the CPU
    gen_ms: float  # wall time from the previous clip (or the session's admission) to this one
    media: list[bytes] = field(default_factory=list)  # fmp4: [segment]; jpeg: one per frame; raw: []

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    params: SessionParams
    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    state: SessionState = SessionState.WAITING
    error: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    # scheduling
    last_step: int = -1  # stamp of its last denoising step (round-robin fairness)
    cancel_requested: bool = False
    # what it has produced
    frames_done: int = 0  # frames handed out so far
    clips_done: int = 0
    clip_started_at: float = 0.0  # when the chunk in flight began (clip gen_ms)
    # consumer backpressure: clips produced but not yet taken by the consumer (engine thread and event loop)
    _pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def frames_left(self) -> int | None:
        return None if self.params.num_frames is None else self.params.num_frames - self.frames_done

    def add_pending(self, n: int) -> None:
        with self._lock:
            self._pending += n

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending
