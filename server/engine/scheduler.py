"""Scheduling policy: admission, the bounded waiting queue, and which sessions run each engine step.

No tensors here. Each engine step runs (1) one batched write of the condition frames of newly admitted
sessions, then (2) one batched denoising step over up to `max_batch` generating sessions, each at its own
timestep and cache length. Sessions are picked least-recently-run first, so none starves however many
there are. A session whose consumer is more than `max_pending_clips` clips behind is PAUSED (its pages
kept, its GPU time given to others) until the consumer catches up.

Admission: the pool holds exactly `max_sessions` full queues (a write reuses the pages of dequeued frames in
place, so no write needs more), so a session admitted is a session whose pages exist; beyond that, up to
`max_waiting` sessions queue and the rest are refused ("server busy").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .session import Session, SessionState


@dataclass
class StepPlan:
    prefill: list[Session] = field(default_factory=list)
    denoise: list[Session] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.denoise


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Session] = deque()
        self.active: list[Session] = []  # admitted, not finished
        self.step_count = 0
        self._tick = 0

    def add(self, session: Session) -> bool:
        """Queue a new session; False when the waiting queue is full (the caller refuses it as busy)."""
        if len(self.waiting) + len(self.active) >= self.config.max_waiting + self.config.max_sessions:
            return False
        self.waiting.append(session)
        return True

    def take_cancelled(self) -> list[Session]:
        """Remove and return sessions whose cancellation was requested (waiting or active)."""
        gone = [s for s in self.waiting if s.cancel_requested] + [s for s in self.active if s.cancel_requested]
        if gone:
            self.waiting = deque(s for s in self.waiting if not s.cancel_requested)
            self.active = [s for s in self.active if not s.cancel_requested]
        return gone

    def remove(self, session: Session) -> None:
        if session in self.active:
            self.active.remove(session)

    def schedule(self) -> StepPlan:
        self.step_count += 1
        cfg = self.config
        plan = StepPlan()
        while self.waiting and len(self.active) < cfg.max_sessions:
            session = self.waiting.popleft()
            session.state = SessionState.PREFILLING
            self.active.append(session)
        plan.prefill = [s for s in self.active if s.state is SessionState.PREFILLING][: cfg.max_batch]

        ready = []
        for s in self.active:
            if s.state in (SessionState.GENERATING, SessionState.PAUSED):
                s.state = SessionState.PAUSED if s.pending > cfg.max_pending_clips else SessionState.GENERATING
                if s.state is SessionState.GENERATING:
                    ready.append(s)
        ready.sort(key=lambda s: s.last_step)
        plan.denoise = ready[: cfg.max_batch]
        for s in plan.denoise:  # a strictly increasing stamp: round robin, ties broken by last run order
            self._tick += 1
            s.last_step = self._tick
        return plan

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_active(self) -> int:
        return len(self.active)
