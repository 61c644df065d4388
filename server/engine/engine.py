"""The engine: a background thread that runs schedule -> run -> postprocess, and an asyncio-friendly API.

`await engine.start_session(params)` returns a `SessionHandle`; `async for clip in handle` yields finished
clips in order (encoded on a worker pool, off the engine thread); `handle.cancel()` stops the session and
frees its pages at the next step boundary. Nothing here blocks the caller's event loop: events cross from
the worker threads with `loop.call_soon_threadsafe`.

Faults: an exception while running a batch fails exactly that batch's sessions (with the reason) and the
engine goes on; if the engine thread itself dies, `alive` turns False for the health checks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ca2vdm.server.media import ClipEncoder, make_encoder
from ca2vdm.server.model.loader import Pipeline

from .config import EngineConfig
from .runner import ModelRunner
from .scheduler import Scheduler, StepPlan
from .session import Clip, Session, SessionParams, SessionState

log = logging.getLogger("ca2vdm.engine")


class ServerBusy(RuntimeError):
    """No room: the waiting queue is full."""


class SessionFailed(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Histogram:
    """Cumulative bucket counts (Prometheus semantics) in bounded memory."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0
        self.max = float("-inf")

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))] += 1
        self.sum += value
        self.count += 1
        self.max = max(self.max, value)


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class EngineStats:
    """Counters and histograms for metrics; written by the engine thread, read by anyone."""

    sessions_total: dict[str, int] = field(
        default_factory=lambda: {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
    )
    frames_generated: int = 0
    steps: int = 0
    batch_size: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64)))
    denoise_step_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))
    time_to_first_clip_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))
    clip_interval_seconds: Histogram = field(default_factory=lambda: Histogram(_SECONDS))


@dataclass(frozen=True)
class StreamInfo:
    session_id: str
    width: int
    height: int
    fps: int
    chunk_frames: int
    format: str
    mime: str | None
    init_segment: bytes | None


@dataclass(eq=False)
class _Live:
    """The engine's record of a session it serves: the scheduler's record, the consumer's handle, its encoder,
    and the last encode job (each job waits for the previous one: a session's clips leave in order)."""

    session: Session
    handle: SessionHandle
    encoder: ClipEncoder | None
    tail: Future[None] | None = None


class SessionHandle:
    """The consumer's side of a session: an async iterator of clips."""

    def __init__(self, engine: Engine, session: Session, info: StreamInfo, loop: asyncio.AbstractEventLoop):
        self._engine, self._session, self.info = engine, session, info
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def state(self) -> SessionState:
        return self._session.state

    def _deliver(self, event: object) -> None:  # any thread
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def cancel(self) -> None:
        self._engine.cancel(self._session)

    async def __aiter__(self) -> AsyncIterator[Clip]:
        while True:
            event = await self._queue.get()
            if isinstance(event, Clip):
                self._session.add_pending(-1)
                self._engine.wake()
                yield event
            elif isinstance(event, SessionFailed):
                raise event
            else:  # done
                return


class Engine:
    def __init__(self, pipe: Pipeline, config: EngineConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config)
        self.runner = ModelRunner(pipe, self.config)
        self.stats = EngineStats()
        self.fault_hook: Callable[[str, list[Session]], None] | None = None  # tests inject failures here
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
        graphs of every batch bucket and runs throwaway sessions through every phase (`ModelRunner.warm_up`).
        It does so itself: cuBLAS and cuDNN handles are per thread, and with the warm-up on the caller's thread
        the first session's prefill still took 85 ms instead of 16 (H200, bench/results/first_clip_h200.json)."""
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

    async def start_session(self, params: SessionParams) -> SessionHandle:
        """Queue a session; raises ServerBusy when it cannot even wait."""
        if not self.alive:
            raise RuntimeError("engine is not running")
        height, width = self.pipe.frame_size
        if params.image is not None and tuple(params.image.shape) != (height, width, 3):
            raise ValueError(f"image must be {(height, width, 3)}, got {tuple(params.image.shape)}")
        session = Session(params)
        encoder = None if params.format == "raw" else make_encoder(params.format, width, height, self.pipe.config.fps)
        info = StreamInfo(
            session_id=session.id,
            width=width,
            height=height,
            fps=self.pipe.config.fps,
            chunk_frames=self.pipe.config.chunk_frames,
            format=params.format,
            mime=None if encoder is None else encoder.mime,
            init_segment=None if encoder is None else encoder.init_segment(),
        )
        handle = SessionHandle(self, session, info, asyncio.get_running_loop())
        with self._cond:
            if not self.scheduler.add(session):
                self.stats.sessions_total["rejected"] += 1
                raise ServerBusy("server busy: too many sessions waiting")
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

    # ---- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            if self._warmup:
                self.runner.warm_up()
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
                        self._cond.wait(timeout=0.5)
                        continue
                for s in cancelled:
                    self._finish(s, SessionState.FAILED if s.error else SessionState.CANCELLED, s.error)
                if not plan.is_empty:
                    self.step(plan)
        except BaseException:  # the thread must not die silently: health checks read `alive`
            self._error = traceback.format_exc()
            log.critical("engine thread died:\n%s", self._error)
            raise

    def step(self, plan: StepPlan) -> None:
        self.stats.steps += 1
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
        for s, f in zip(sessions, frame0, strict=True):
            s.state = SessionState.GENERATING
            s.clip_started_at = time.monotonic()
            if f is not None:
                self._emit(s, f, gen_ms=(s.clip_started_at - s.created_at) * 1e3)

    def _denoise(self, sessions: list[Session]) -> None:
        start = time.perf_counter()
        done = self.runner.denoise(sessions)
        if done:
            chunk = self.runner.chunk_frames
            counts = [chunk if s.frames_left is None else min(chunk, s.frames_left) for s in done]
            continues = [s for s, n in zip(done, counts, strict=True) if s.frames_left is None or s.frames_left > n]
            clips = self.runner.decode_chunks(done, counts)
            now = time.monotonic()
            for s, frames in zip(done, clips, strict=True):  # out to the encoders before the cache write
                gen_ms = (now - s.clip_started_at) * 1e3
                s.clip_started_at = now
                self._emit(s, frames, gen_ms)
            if continues:
                self.runner.continue_chunks(continues)
        self.stats.batch_size.observe(len(sessions))
        self.stats.denoise_step_seconds.observe(time.perf_counter() - start)

    def _emit(self, s: Session, frames, gen_ms: float) -> None:
        clip = Clip(index=s.clips_done, first_frame=s.frames_done, frames=frames, gen_ms=gen_ms)
        if s.clips_done == 0:
            self.stats.time_to_first_clip_seconds.observe(time.monotonic() - s.created_at)
        else:
            self.stats.clip_interval_seconds.observe(gen_ms / 1e3)
        s.clips_done += 1
        s.frames_done += clip.num_frames
        self.stats.frames_generated += clip.num_frames
        s.add_pending(1)
        self._submit_encode(s, clip)
        if s.frames_left is not None and s.frames_left <= 0:
            self._finish(s, SessionState.COMPLETED)

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
            except Exception as exc:  # fails this session only; the engine thread ends it at the next step
                log.exception("encoding failed for session %s", s.id)
                s.error = f"encoding failed: {type(exc).__name__}: {exc}"
                self.cancel(s)
                handle._deliver(SessionFailed("internal", s.error))
                return
            handle._deliver(clip)

        live.tail = self._pool.submit(job)

    def _finish(self, s: Session, state: SessionState, error: str | None = None) -> None:
        """End a session: free its pages at once, tell its consumer after its last clip."""
        s.state, s.error = state, error
        self.runner.release(s)
        with self._cond:
            self.scheduler.remove(s)
        self.stats.sessions_total[state.value] += 1
        live = self._live.pop(s.id, None)
        if live is None:
            return
        event: object = "done" if state is not SessionState.FAILED else SessionFailed("internal", error or "failed")

        def deliver() -> None:
            if live.tail is not None:
                live.tail.result()
            live.handle._deliver(event)

        self._pool.submit(deliver)
