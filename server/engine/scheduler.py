"""Scheduling policy: admission, the waiting queues, and which sessions run each engine step. No tensors here.

Each engine step runs (1) one batched write of the condition frames of newly admitted sessions, then (2) one
batched denoising step over up to `max_batch` sessions, each at its own timestep and cache length. Who is in the
batch (live before background, earliest deadline first):
1. live sessions that have no generated clip out yet, oldest first: time to first clip comes before everything.
   They run alone (a small batch, so a short step) while the other live sessions are far enough ahead of their
   viewers to wait for them; a live session that could not (it would miss its due time if it waited for the first
   clips and then ran with everyone) joins them, earliest due first;
2. live sessions by the due time of their next clip; one more than `max_lead_s` ahead of its viewer waits;
3. background sessions (pace "max": REST jobs, max-pace streams), least recently run first, in what is left of the
   batch; in a batch with live sessions only as many as the capacity model says cost no live session its due
   time, and none beside a live session's first clip; alone, only as many as keep the step under
   `max_background_step_s` (a live session that arrives waits at most that for its first step).
A session whose consumer is behind (more than `max_pending_clips` clips, or `max_pending_bytes`, not yet taken or
acknowledged; nothing beyond its first clip until the consumer acknowledges it: a client that never reads costs one
clip) is
PAUSED: it keeps its pages and gives its GPU time, and its share of real-time capacity, to others until the consumer
catches up (and, live, until it fits again).

Admission: pages (the pool holds exactly `max_sessions` full queues, and a write reuses the pages of dequeued frames
in place, so an admitted session's pages always exist), background slots (`max_background_sessions`, so jobs never
take every slot), and for a live session real-time capacity: it is admitted only if every live session keeps real
time with it (`CapacityModel.fits`), except the first, which is served as well as the engine can. Beyond that, up
to `max_waiting` sessions per class queue, admitted fairly between clients: the waiting session whose client holds
the fewest active sessions first, then the oldest. The engine ends
(`StepPlan.expired`) a live session that found no capacity for `admission_wait_s` (server_busy, with a retry hint),
and a session paused for `max_paused_s`, or for `evict_paused_s` while a session of another client waits
(slow_consumer).

Detached sessions (their consumer's connection dropped) keep their pages but take no GPU time and no real-time
capacity. `StepPlan.unload` lists those whose pages go (kept in host memory instead, for a rebuilt resume): after
`resume_grace_s`, beyond `max_detached_sessions` (oldest first), and whenever a waiting session needs a slot that a
detached one holds (oldest first).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .capacity import CapacityModel
from .config import EngineConfig
from .session import Session, SessionState, rows_of


@dataclass
class StepPlan:
    prefill: list[Session] = field(default_factory=list)
    denoise: list[Session] = field(default_factory=list)
    expired: list[tuple[Session, str, str]] = field(default_factory=list)  # (session, error code, message)
    unload: list[Session] = field(default_factory=list)  # detached sessions whose pages go

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.denoise and not self.expired and not self.unload


class Scheduler:
    def __init__(self, config: EngineConfig, capacity: CapacityModel, fps: int,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.config, self.capacity, self.fps, self.clock = config, capacity, fps, clock
        self.waiting_live: deque[Session] = deque()
        self.waiting_background: deque[Session] = deque()
        self.active: list[Session] = []  # admitted, not finished
        self.step_count = 0
        self._tick = 0
        self._favoured: set[Session] = set()  # waiting sessions a slot was freed for (admitted first)

    # ---- membership ----------------------------------------------------------------------------------------

    def add(self, session: Session) -> bool:
        """Queue a new session; False when its class's waiting queue is full (the caller refuses it as busy)."""
        cfg = self.config
        queue = self.waiting_live if session.is_live else self.waiting_background
        free = cfg.max_sessions - self.rows_held
        if not session.is_live:
            free = min(free, cfg.max_background_sessions - sum(not s.is_live for s in self.active))
        if len(queue) >= cfg.max_waiting + max(0, free):
            return False
        queue.append(session)
        return True

    def take_cancelled(self) -> list[Session]:
        """Remove and return sessions whose cancellation was requested (waiting or active)."""
        gone = [s for s in (*self.waiting_live, *self.waiting_background, *self.active) if s.cancel_requested]
        for s in gone:
            self.remove(s)
        return gone

    def remove(self, session: Session) -> None:
        self._favoured.discard(session)
        for group in (self.active, self.waiting_live, self.waiting_background):
            if session in group:
                group.remove(session)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting_live) + len(self.waiting_background)

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def rows_held(self) -> int:
        """Cache streams the admitted sessions hold (a guided session holds two): `max_sessions` bounds this."""
        return rows_of(self.active)

    @property
    def rows_waiting(self) -> int:
        """Cache streams the waiting sessions will hold once admitted."""
        return rows_of(self.waiting_live) + rows_of(self.waiting_background)

    def live_steps(self) -> list[int]:
        """Denoising steps per chunk of the admitted live sessions that are not paused: the real-time load. A paused
        session gives its share up (a client that stopped reading must not keep others out) and takes it back only
        if it fits again when its client catches up; a cancelled one gives it up at once (before the next step
        removes it: a cluster's router asks in between)."""
        return [s.params.steps for s in self.active if s.is_live and not s.cancel_requested
                and s.state not in (SessionState.PAUSED, SessionState.DETACHED)
                for _ in range(s.params.rows)]  # fmt: skip

    # ---- one step ------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self.step_count += 1
        now = self.clock()
        plan = StepPlan()
        self._update_pauses(now)
        self._expire(now, plan)
        self._unload_detached(now, plan)
        self._admit(now)
        plan.prefill = [s for s in self.active if s.state is SessionState.PREFILLING][: self.config.max_batch]
        plan.denoise = self._batch(now)
        for s in plan.denoise:  # a strictly increasing stamp: round robin, ties broken by last run order
            self._tick += 1
            s.last_step = self._tick
        return plan

    def _update_pauses(self, now: float) -> None:
        cfg = self.config
        for s in self.active:
            if s.state not in (SessionState.GENERATING, SessionState.PAUSED):
                continue
            clips, nbytes = s.pending
            allowed = cfg.max_pending_clips if s.acked_frames > 0 else 0
            behind = clips > allowed or nbytes > cfg.max_pending_bytes
            if behind and s.state is SessionState.GENERATING:
                s.state, s.paused_since = SessionState.PAUSED, now
            elif not behind and s.state is SessionState.PAUSED:
                if s.is_live and not self._fits_live(s):
                    continue  # caught up, but its real-time share went to others meanwhile
                s.state, s.paused_since = SessionState.GENERATING, None

    def _expire(self, now: float, plan: StepPlan) -> None:
        cfg = self.config
        paused = sorted((s for s in self.active if s.paused_since is not None), key=lambda s: s.paused_since)
        waiting = [*self.waiting_live, *self.waiting_background]
        for s in paused:
            for_s = now - s.paused_since  # type: ignore[operator]
            # evicted only for a waiting session of another client: one client's sessions never take turns
            other = next((w for w in waiting if w.client is None or w.client != s.client), None)
            if for_s > cfg.max_paused_s or (other is not None and for_s > cfg.evict_paused_s):
                if other is not None:  # the freed slot is its: first in its queue
                    waiting.remove(other)
                    queue = self.waiting_live if other.is_live else self.waiting_background
                    queue.remove(other)
                    queue.appendleft(other)
                    self._favoured.add(other)
                why = "while others waited for its slot" if for_s <= cfg.max_paused_s else ""
                plan.expired.append((s, "slow_consumer", f"the client took no clip for {for_s:.0f} s {why}".strip()))
        for s in self.waiting_live:
            if now - s.created_at > cfg.admission_wait_s:
                plan.expired.append((s, "server_busy", "no real-time capacity for another live session; retry "
                                     "later or ask for pace 'max'"))  # fmt: skip
        for s, _, _ in plan.expired:
            self.remove(s)

    def _unload_detached(self, now: float, plan: StepPlan) -> None:
        cfg = self.config
        detached = sorted((s for s in self.active if s.state is SessionState.DETACHED),
                          key=lambda s: s.detached_at)  # type: ignore[arg-type, return-value]  # fmt: skip
        short = max(0, self.rows_held + self.rows_waiting - cfg.max_sessions)  # rows waiting sessions lack
        for i, s in enumerate(detached):
            over = len(detached) - i > cfg.max_detached_sessions
            if over or short > 0 or now - s.detached_at >= cfg.resume_grace_s:  # type: ignore[operator]
                short -= s.params.rows
                plan.unload.append(s)
                self.active.remove(s)
                s.state = SessionState.UNLOADED

    def _fits_live(self, s: Session) -> bool:
        """Whether live session `s` can run with the other running live sessions and all keep real time. Alone it
        always can: where no session keeps real time, one is served as well as the engine can."""
        live = self.live_steps()
        return not live or self.capacity.fits([*live, *[s.params.steps] * s.params.rows])

    def _can_admit_now(self, s: Session) -> bool:
        if self.rows_held + s.params.rows > self.config.max_sessions:
            return False
        if s.is_live:
            return self._fits_live(s)
        background = sum(not x.is_live and x.state is not SessionState.DETACHED for x in self.active)
        return background < self.config.max_background_sessions

    def _admit(self, now: float) -> None:
        for queue in (self.waiting_live, self.waiting_background):
            while queue:
                held: dict[str | None, int] = {}
                for a in self.active:
                    held[a.client] = held.get(a.client, 0) + 1
                s = min(queue, key=lambda w: (w not in self._favoured, held.get(w.client, 0) if w.client is not None
                                              else 0, w.created_at))  # fmt: skip
                if not self._can_admit_now(s):
                    break
                queue.remove(s)
                self._favoured.discard(s)
                s.state, s.admitted_at = SessionState.PREFILLING, now
                self.active.append(s)

    def _batch(self, now: float) -> list[Session]:
        """Who runs this step (module docstring). Batches are bounded in rows (`max_batch`): a guided session is two."""
        cfg = self.config
        ready = [s for s in self.active if s.state is SessionState.GENERATING]
        first = sorted((s for s in ready if s.is_live and not s.has_generated), key=lambda s: s.admitted_at or 0.0)
        due = {s: s.due(self.fps) for s in ready if s.is_live and s.has_generated}
        live = sorted((s for s, d in due.items() if d - now <= cfg.max_lead_s),  # type: ignore[operator]
                      key=lambda s: (due[s], s.last_step))  # fmt: skip
        background = sorted((s for s in ready if not s.is_live), key=lambda s: s.last_step)
        if first:  # first clips alone, joined only by the live sessions that cannot wait for them
            live = live[: self._must_join(_within(first, cfg.max_batch), live, now, due)]
        batch = _within(first + live, cfg.max_batch)
        room = len(_within(background, cfg.max_batch - rows_of(batch), at_least_one=not batch))
        if room and batch:
            room = 0 if first else self._background_room(batch, background[:room], now, due)
        elif room:  # background alone: a step short enough that a live session arriving meanwhile waits little
            room = max(1, self._within_time(background[:room], cfg.max_background_step_s))
        return batch + background[:room]

    def _must_join(self, first: list[Session], live: list[Session], now: float, due: dict) -> int:
        """How many of the live sessions (earliest due first) run beside first clips this step: the fewest such that
        every other one is still out on time if it waits for the first clips to finish and then runs in a batch with
        everyone (unmeasured step times: all join; a first clip then shares its batch as it would anyway)."""
        margin, total = self.config.deadline_margin_s, rows_of(first) + rows_of(live)
        after, chunk_after = self.capacity.step_time(total), self.capacity.chunk_time(total)
        for k in range(len(live) + 1):
            step = self.capacity.step_time(rows_of(first) + rows_of(live[:k]))
            if step is None or after is None:
                return len(live)
            wait = max(s.steps_left for s in first) * step + self.capacity.chunk_time(rows_of(first))
            if all(now + wait + s.steps_left * after + chunk_after <= due[s] - margin for s in live[k:]):
                return k
        return len(live)

    def _within_time(self, sessions: list[Session], seconds: float) -> int:
        """The most of `sessions` (a prefix) whose step the capacity model puts within `seconds` (unmeasured: all)."""
        for k in range(len(sessions), 0, -1):
            step = self.capacity.step_time(rows_of(sessions[:k]))
            if step is None or step <= seconds:
                return k
        return 0

    def _background_room(self, live: list[Session], background: list[Session], now: float, due: dict) -> int:
        """How many of `background` (a prefix) can join this batch of live sessions with every one still on time."""
        margin = self.config.deadline_margin_s
        for k in range(len(background), 0, -1):
            b = rows_of(live) + rows_of(background[:k])
            step = self.capacity.step_time(b)
            if step is None:
                return 0
            chunk = self.capacity.chunk_time(b)
            if all(now + s.steps_left * step + chunk <= due[s] - margin for s in live):
                return k
        return 0


def _within(sessions: list[Session], rows: int, at_least_one: bool = True) -> list[Session]:
    """The longest prefix of `sessions` within `rows` rows; with `at_least_one`, never empty when `sessions` is not
    (a session of more rows than a batch holds still runs: the runner splits its forward)."""
    out, used = [], 0
    for s in sessions:
        if used + s.params.rows > rows and (out or not at_least_one):
            break
        out.append(s)
        used += s.params.rows
    return out
