"""The engine: a background thread that runs schedule -> run -> postprocess, and an asyncio-friendly API.

`await engine.start_session(params)` returns a `SessionHandle`; `async for clip in handle` yields finished
clips in order (encoded on a worker pool, off the engine thread); `handle.cancel()` stops the session and
frees its pages at the next step boundary. Nothing here blocks the caller's event loop: events cross from
the worker threads with `loop.call_soon_threadsafe`.

Real time: each step's phases are timed (without waiting for the GPU) into a `CapacityModel` that admission and
the scheduler read; every clip of a live session is checked against its viewer's playback clock (stalls, lateness).

Faults: an exception while running a batch fails exactly that batch's sessions (with the reason) and the
engine goes on; if the engine thread itself dies, `alive` turns False for the health checks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from torch import Tensor

from ca2vdm.server.media import ClipEncoder, make_encoder
from ca2vdm.server.model.loader import Pipeline

from .capacity import CapacityModel
from .config import EngineConfig
from .handle import DONE, ServerBusy, SessionFailed, SessionHandle, StreamInfo
from .runner import ModelRunner
from .scheduler import Scheduler, StepPlan
from .session import Clip, Session, SessionParams, SessionState
from .stats import EngineStats

__all__ = ["Engine", "ServerBusy", "SessionFailed", "SessionHandle", "StreamInfo"]

log = logging.getLogger("ca2vdm.engine")


@dataclass(eq=False)
class _Live:
    """The engine's record of a session it serves: the scheduler's record, the consumer's handle, its encoder,
    and the last encode job (each job waits for the previous one: a session's clips leave in order)."""

    session: Session
    handle: SessionHandle
    encoder: ClipEncoder | None
    tail: Future[None] | None = None


class Engine:
    def __init__(self, pipe: Pipeline, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.pipe = pipe
        self.config = config or EngineConfig()
        self.fps, self.chunk_frames = pipe.config.fps, pipe.config.chunk_frames
        self.clock = clock
        self.capacity = CapacityModel(self.fps, self.chunk_frames, self.config.max_batch, self.config.realtime_target)
        self.scheduler = Scheduler(self.config, self.capacity, self.fps, clock)
        self.runner = ModelRunner(pipe, self.config)
        self.stats = EngineStats()
        self.fault_hook: Callable[[str, list[Session]], None] | None = None  # tests inject failures here
        self.on_session_end: Callable[[], None] | None = None  # called on the engine thread when a slot frees
        self._live: dict[str, _Live] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.config.encode_workers, thread_name_prefix="ca2vdm-encode")
        self._cond = threading.Condition()
        self._running = False
        self._thread = threading.Thread(target=self._loop, name="ca2vdm-engine", daemon=True)
        self._error: str | None = None
        self._ready = threading.Event()  # set once the thread has warmed up (or failed to)
        self._warmup = True

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, warmup: bool = True) -> Engine:
        """Start the engine thread and return once it serves. With `warmup`, the thread first captures the CUDA
        graphs of every batch bucket, runs throwaway sessions through every phase and measures them
        (`ModelRunner.warm_up`: the capacity model's first data). It does so itself: cuBLAS and cuDNN handles are
        per thread, and with the warm-up on the caller's thread the first session's prefill still took 85 ms
        instead of 16 (H200, bench/results/first_clip_h200.json)."""
        self._warmup = warmup
        self._running = True
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join(timeout=30)
            self._pool.shutdown(wait=False)
            raise RuntimeError(f"engine warm-up failed:\n{self._error}")
        return self

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- API -------------------------------------------------------------------------------------------

    async def start_session(self, params: SessionParams, *, auto_ack: bool = True,
                            client: str | None = None) -> SessionHandle:  # fmt: skip
        """Queue a session; raises ServerBusy when it cannot even wait. `auto_ack`: see `SessionHandle`; `client`:
        who asks (an address), so that admission is fair between clients."""
        if not self.alive:
            raise RuntimeError("engine is not running")
        height, width = self.pipe.frame_size
        if params.image is not None and tuple(params.image.shape) != (height, width, 3):
            raise ValueError(f"image must be {(height, width, 3)}, got {tuple(params.image.shape)}")
        session = Session(params, created_at=self.clock(), client=client)
        encoder = None if params.format == "raw" else make_encoder(params.format, width, height, self.fps)
        info = StreamInfo(
            session_id=session.id,
            width=width,
            height=height,
            fps=self.fps,
            chunk_frames=self.chunk_frames,
            format=params.format,
            mime=None if encoder is None else encoder.mime,
            init_segment=None if encoder is None else encoder.init_segment(),
        )
        handle = SessionHandle(self, session, info, asyncio.get_running_loop(), auto_ack=auto_ack)
        with self._cond:
            if not self.scheduler.add(session):
                self.stats.sessions_total["rejected"] += 1
                kind = "live" if session.is_live else "background"
                raise ServerBusy(f"server busy: too many {kind} sessions waiting")
            self._live[session.id] = _Live(session, handle, encoder)
            self._cond.notify_all()
        return handle

    def cancel(self, session: Session) -> None:
        with self._cond:
            if not session.state.is_finished:
                session.cancel_requested = True
                self._cond.notify_all()

    @property
    def num_active(self) -> int:
        return self.scheduler.num_active

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_paused(self) -> int:
        return sum(s.state is SessionState.PAUSED for s in list(self.scheduler.active))

    def realtime_capacity(self, steps: int | None = None) -> int:
        """Live sessions of `steps` denoising steps (default: the model's) that fit in real time, by measurement."""
        return self.capacity.sessions(steps or self.pipe.config.default_steps, self.config.max_sessions)

    # ---- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            if self._warmup:
                self._record_timings(self.runner.warm_up())
        except BaseException:
            self._error = traceback.format_exc()
            log.critical("engine warm-up failed:\n%s", self._error)
            return
        finally:
            self._ready.set()
        try:
            while True:
                with self._cond:
                    if not self._running:
                        break
                    cancelled = self.scheduler.take_cancelled()
                    plan = self.scheduler.schedule()
                    if plan.is_empty and not cancelled:
                        self._cond.wait(timeout=self._idle_timeout())
                        continue
                for s in cancelled:
                    self._finish(s, SessionState.FAILED if s.error else SessionState.CANCELLED, s.error)
                self.step(plan)
                self._record_timings(self.runner.timer.take())
        except BaseException:  # the thread must not die silently: health checks read `alive`
            self._error = traceback.format_exc()
            log.critical("engine thread died:\n%s", self._error)
            raise

    def _idle_timeout(self) -> float:
        """Sleep until the earliest live session ahead of its viewer may run again (at most 0.5 s)."""
        now, lead = self.clock(), self.config.max_lead_s
        dues = [s.due(self.fps) for s in self.scheduler.active if s.is_live and s.has_generated]
        wake = min((d - lead - now for d in dues if d is not None), default=0.5)  # type: ignore[operator]
        return min(0.5, max(0.001, wake))

    def _record_timings(self, samples: list[tuple[str, int, float]]) -> None:
        for phase, batch, seconds in samples:
            self.capacity.record(phase, batch, seconds)
            if phase == "step":
                self.stats.denoise_step_seconds.observe(seconds)

    def step(self, plan: StepPlan) -> None:
        self.stats.steps += 1
        for s, code, message in plan.expired:
            if code == "slow_consumer":
                log.warning("session %s: %s", s.id, message)
            self._finish(s, SessionState.FAILED, message, code=code)
        if plan.prefill:
            self._guarded("prefill", plan.prefill, self._prefill)
        if plan.denoise:
            self._guarded("denoise", plan.denoise, self._denoise)

    def _guarded(self, stage: str, sessions: list[Session], fn: Callable[[list[Session]], None]) -> None:
        try:
            if self.fault_hook is not None:
                self.fault_hook(stage, sessions)
            fn(sessions)
        except Exception as exc:  # fail this batch only
            log.exception("%s failed for sessions %s", stage, [s.id for s in sessions])
            for s in sessions:
                if not s.state.is_finished:
                    self._finish(s, SessionState.FAILED, f"{stage} failed: {type(exc).__name__}: {exc}")

    def _prefill(self, sessions: list[Session]) -> None:
        frame0 = self.runner.prefill(sessions)
        now = self.clock()
        for s, f in zip(sessions, frame0, strict=True):
            s.state, s.clip_started_at, s.steps_left = SessionState.GENERATING, now, s.params.steps
            if f is not None:
                self._emit(s, f, gen_ms=(now - s.created_at) * 1e3, generated=False)

    def _denoise(self, sessions: list[Session]) -> None:
        self.stats.batch_size.observe(len(sessions))
        done = self.runner.denoise(sessions)
        for s in sessions:
            s.steps_left -= 1
        if not done:
            return
        chunk = self.chunk_frames
        counts = [chunk if s.frames_left is None else min(chunk, s.frames_left) for s in done]
        continues = [s for s, n in zip(done, counts, strict=True) if s.frames_left is None or s.frames_left > n]
        clips = self.runner.decode_chunks(done, counts)
        now = self.clock()
        for s, frames in zip(done, clips, strict=True):  # out to the encoders before the cache write
            gen_ms = (now - s.clip_started_at) * 1e3
            s.clip_started_at = now
            self._emit(s, frames, gen_ms, generated=True)
        if continues:
            self.runner.continue_chunks(continues)
            for s in continues:
                s.steps_left = s.params.steps

    def _emit(self, s: Session, frames: Tensor, gen_ms: float, generated: bool) -> None:
        now = self.clock()
        clip = Clip(index=s.clips_done, first_frame=s.frames_done, frames=frames, gen_ms=gen_ms)
        if s.clips_done == 0:
            self.stats.time_to_first_clip_seconds.observe(now - s.created_at)
        else:
            self.stats.clip_interval_seconds.observe(gen_ms / 1e3)
        if generated and s.is_live:
            self._check_clock(s, clip, now)
        s.clips_done += 1
        s.frames_done += clip.num_frames
        self.stats.frames_generated += clip.num_frames
        s.add_unacked(clip.end_frame)
        self._submit_encode(s, clip)
        if s.frames_left is not None and s.frames_left <= 0:
            self._finish(s, SessionState.COMPLETED)

    def _check_clock(self, s: Session, clip: Clip, now: float) -> None:
        """A live clip against its viewer's clock: the first generated clip starts the clock; a later one is due
        when the viewer reaches its first frame, and one that is late stalls the viewer, whose clock then moves on
        by the delay (a player rebuffers and resumes)."""
        due = s.due(self.fps)
        if due is None:
            s.clock_start, s.clock_frame = now, clip.first_frame
            return
        late = now - due
        clip.ahead_ms = -late * 1e3
        self.stats.clip_lateness_seconds.observe(late)
        if late > 0:
            self.stats.stalls += 1
            self.stats.stall_seconds += late
            s.clock_start += late  # type: ignore[operator]

    def _submit_encode(self, s: Session, clip: Clip) -> None:
        """Encode on the worker pool, after the session's previous clip."""
        live = self._live[s.id]
        previous, encoder, handle = live.tail, live.encoder, live.handle

        def job() -> None:
            if previous is not None:
                previous.result()
            try:
                if encoder is not None:
                    clip.media = encoder.encode(clip.frames, clip.first_frame)
                    s.add_unacked_bytes(clip.end_frame, sum(map(len, clip.media)))
            except Exception as exc:  # fails this session only; the engine thread ends it at the next step
                log.exception("encoding failed for session %s", s.id)
                s.error = f"encoding failed: {type(exc).__name__}: {exc}"
                self.cancel(s)
                handle.deliver(SessionFailed("internal", s.error))
                return
            handle.deliver(clip)

        live.tail = self._pool.submit(job)

    def _finish(self, s: Session, state: SessionState, error: str | None = None, code: str = "internal") -> None:
        """End a session: free its pages at once, tell its consumer after its last clip."""
        s.state, s.error, s.error_code = state, error, code
        self.runner.release(s)
        with self._cond:
            self.scheduler.remove(s)
        outcome = {"slow_consumer": "slow_consumer", "server_busy": "rejected"}.get(code, state.value)
        self.stats.sessions_total[outcome] += 1
        if self.on_session_end is not None:
            self.on_session_end()
        live = self._live.pop(s.id, None)
        if live is None:
            return
        event: object = DONE if state is not SessionState.FAILED else SessionFailed(code, error or "failed")

        def deliver() -> None:
            if live.tail is not None:
                live.tail.result()
            live.handle.deliver(event)

        self._pool.submit(deliver)
