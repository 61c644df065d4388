"""A streaming session as the scheduler sees it: what the client asked for, where it stands, what it has produced.

Lifecycle: WAITING (queued for admission) -> PREFILLING (admitted: the condition frame goes into the cache)
-> GENERATING (denoising chunk after chunk; PAUSED while its consumer is too far behind) -> COMPLETED |
CANCELLED | FAILED. A session whose consumer's connection dropped is DETACHED (its pages kept, no GPU time) until
it is resumed (back to GENERATING) or its pages are wanted: it is then UNLOADED (no pages; its kept history and
sampler state in host memory) until it is resumed (WAITING again: admitted like a new session, and its prefill
rebuilds the cache from that history) or dropped (CANCELLED). The scheduler reads and sets `state`. No tensors
here: the runner keeps each session's device state (pages, latents, generator) in its own record
(`runner.GenerationState`), created at prefill.

Pace: a "realtime" session is live, watched at the model's fps: its playback clock starts when its first generated
clip is out, each later clip is due when the viewer reaches its first frame, and a stall (a clip out after its
due time) moves the clock on by the delay, as the viewer's player does when it rebuffers. A "max" session (REST
jobs, or a stream that asks for it) has no clock and runs in the background on what live sessions leave.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ca2vdm.server.media import FORMATS
from ca2vdm.server.model.diffusion import DEFAULT_STEPS, SAMPLERS
from ca2vdm.server.model.prompt import Prompt

#: Request paces (the API's one list).
PACES = ("realtime", "max")


class SessionState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    GENERATING = "generating"
    PAUSED = "paused"
    DETACHED = "detached"
    UNLOADED = "unloaded"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (SessionState.COMPLETED, SessionState.CANCELLED, SessionState.FAILED)

    @property
    def is_detached(self) -> bool:
        return self in (SessionState.DETACHED, SessionState.UNLOADED)


@dataclass(frozen=True)
class SessionParams:
    """A validated generation request. `image` is (H, W, 3) uint8 at the model's frame size, or None. `prompt`: the
    text condition of a text-conditioned model (None: unconditional, the model's null caption)."""

    image: Tensor | None = None
    seed: int = 0
    sampler: str = "ddim"
    steps: int = DEFAULT_STEPS["ddim"]
    num_frames: int | None = None  # None: until cancelled
    format: str = "raw"  # "raw" (frames only) or one of media.FORMATS
    pace: str = "realtime"  # "realtime" (live, at the model's fps) or "max" (background, as fast as spare capacity)
    prompt: Prompt | None = None

    @property
    def rows(self) -> int:
        """Rows of every forward (and cache streams) the session takes: 2 when guided, else 1."""
        return 2 if self.prompt is not None and self.prompt.guided else 1

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
        if self.pace not in PACES:
            raise ValueError(f"unknown pace {self.pace!r}; choose from {PACES}")
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
    ahead_ms: float | None = None  # live sessions: how long before its due time the clip was out (< 0: late)

    @property
    def end_frame(self) -> int:
        return self.first_frame + self.num_frames

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


_ids = itertools.count(1)
_run = secrets.token_hex(3)  # ids stay unique across restarts (saved sessions come back with theirs)


@dataclass(eq=False)
class Session:
    params: SessionParams
    id: str = field(default_factory=lambda: f"s{_run}-{next(_ids)}")
    state: SessionState = SessionState.WAITING
    error: str | None = None
    error_code: str = "internal"  # the API's error code when the session fails (slow_consumer, server_busy, ...)
    created_at: float = field(default_factory=time.monotonic)
    # scheduling
    admitted_at: float | None = None
    last_step: int = -1  # stamp of its last denoising step (round robin among background sessions)
    steps_left: int = 0  # denoising steps left in the chunk in flight
    paused_since: float | None = None
    cancel_requested: bool = False
    # what it has produced
    frames_done: int = 0  # frames handed out so far
    clips_done: int = 0
    clip_started_at: float = 0.0  # when the chunk in flight began (clip gen_ms)
    # the viewer's playback clock (realtime sessions): when the frame `clock_frame` is on screen
    clock_start: float | None = None
    clock_frame: int = 0
    # resuming: the token a consumer presents, whose API key it was issued to, when its connection dropped
    resume_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    owner: str | None = None  # fingerprint of the API key that started it (None: no keys configured)
    detached_at: float | None = None
    # the consumer: clips produced but not yet taken (acknowledged), and their encoded bytes; the engine thread
    # and the encoders add, the consumer's thread acknowledges. The clips themselves are kept until acknowledged:
    # a resumed consumer is sent them again.
    _unacked: deque = field(default_factory=deque, repr=False)  # [end_frame, bytes, Clip] per clip, in order
    _unacked_bytes: int = 0
    acked_frames: int = 0  # every frame before this one has reached the consumer
    client: str | None = None  # who asked (the client's address), for fairness between clients
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_live(self) -> bool:
        return self.params.pace == "realtime"

    @property
    def frames_left(self) -> int | None:
        return None if self.params.num_frames is None else self.params.num_frames - self.frames_done

    @property
    def has_generated(self) -> bool:
        """Whether a clip of generated frames is out (its playback clock runs)."""
        return self.clock_start is not None

    def due(self, fps: int) -> float | None:
        """When the viewer reaches the next frame this session will produce (None: no clock yet)."""
        if self.clock_start is None:
            return None
        return self.clock_start + (self.frames_done - self.clock_frame) / fps

    # ---- the consumer's acknowledgements -----------------------------------------------------------------

    def add_unacked(self, end_frame: int, clip: Clip | None = None) -> None:
        """A clip ending before `end_frame` is out to the consumer (kept, when given, for a resumed consumer)."""
        with self._lock:
            self._unacked.append([end_frame, 0, clip])

    def add_unacked_bytes(self, end_frame: int, nbytes: int) -> None:
        with self._lock:
            for entry in self._unacked:
                if entry[0] == end_frame:
                    entry[1] += nbytes
                    self._unacked_bytes += nbytes
                    return

    def ack(self, frames: int) -> None:
        """The consumer has every frame before `frames`."""
        with self._lock:
            self.acked_frames = max(self.acked_frames, frames)
            while self._unacked and self._unacked[0][0] <= frames:
                self._unacked_bytes -= self._unacked.popleft()[1]

    def unacked_clips(self) -> list[Clip]:
        """The clips not yet acknowledged, in order (a resumed consumer gets them again)."""
        with self._lock:
            return [entry[2] for entry in self._unacked if entry[2] is not None]

    @property
    def unacked_nbytes(self) -> int:
        """Host memory of the unacknowledged clips (frames and encoded media)."""
        return sum(c.frames.numel() + sum(map(len, c.media)) for c in self.unacked_clips())

    @property
    def first_held_frame(self) -> int:
        """The first frame the session can still send: its oldest unacknowledged clip's, or the next it generates."""
        with self._lock:
            clip = self._unacked[0][2] if self._unacked else None
            return self.frames_done if clip is None else clip.first_frame

    @property
    def pending(self) -> tuple[int, int]:
        """(clips, bytes) produced and not yet acknowledged."""
        with self._lock:
            return len(self._unacked), self._unacked_bytes


def rows_of(sessions: Iterable[Session]) -> int:
    """Forward rows (and cache streams) these sessions take: a guided session two, its unconditional branch too."""
    return sum(s.params.rows for s in sessions)
