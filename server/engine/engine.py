"""The engine: a background thread that runs schedule -> run -> postprocess, and an asyncio-friendly API.

`await engine.start_session(params)` returns a `SessionHandle`; `async for clip in handle` yields finished
clips in order (encoded on a worker pool, off the engine thread); `handle.cancel()` stops the session and
frees its pages at the next step boundary. Nothing here blocks the caller's event loop: events cross from
the worker threads with `loop.call_soon_threadsafe`.

Real time: each step's phases are timed (without waiting for the GPU) into a `CapacityModel` that admission and
the scheduler read; every clip of a live session is checked against its viewer's playback clock (stalls, lateness).

Resuming: `handle.detach()` (the consumer's connection dropped) keeps the session, its pages and its unacknowledged
clips; `await engine.resume(token, from_frame)` gives a new handle that gets those clips again from `from_frame` on
and then the rest of the stream, the same frames an uninterrupted stream gets. A detached session whose pages are
wanted is unloaded (host memory; the scheduler decides when) and rebuilt by the prefill of its resume. Sessions the
engine still holds at `stop()` are saved to `resume_dir` and read back at `start()`.

Faults: an exception while running a batch fails exactly that batch's sessions (with the reason) and the
engine goes on; if the engine thread itself dies, `alive` turns False for the health checks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from torch import Tensor

from ca2vdm.server.media import ClipEncoder, make_encoder
from ca2vdm.server.model.loader import Pipeline

from .capacity import CapacityModel
from .config import EngineConfig
from .handle import DONE, ServerBusy, SessionFailed, SessionHandle, StreamInfo
from .resume import load_sessions, save_sessions, take_saved, trim_clip
from .runner import HostState, ModelRunner
from .scheduler import Scheduler, StepPlan
from .session import Clip, Prompt, Session, SessionParams, SessionState
from .stats import EngineStats

__all__ = ["Engine", "ServerBusy", "SessionFailed", "SessionHandle", "StreamInfo"]

log = logging.getLogger("ca2vdm.engine")


@dataclass(eq=False)
class _Live:
    """The engine's record of a session it serves: the scheduler's record, the consumer's handle, its encoder,
    and the last encode job (each job waits for the previous one: a session's clips leave in order)."""

    session: Session
    handle: SessionHandle | None  # None while detached
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
        self._tokens: dict[str, Session] = {}  # resume token -> every session that can be resumed
        self._unloaded: OrderedDict[str, Session] = OrderedDict()  # detached, without pages: oldest first
        self._unloaded_bytes: dict[str, int] = {}  # host memory each of them holds
        self._expired_tokens: OrderedDict[str, None] = OrderedDict()  # recently dropped (answered `expired`)
        self._actions: deque[Callable[[], None]] = deque()  # run on the engine thread between steps
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
        if self.config.resume_dir and not self.config.shared_resume_dir:
            for session, state in load_sessions(self.config.resume_dir, self.config.max_resumable_sessions):
                self._adopt(session, state)
            if self._unloaded:
                log.info("%d sessions read back from %s, resumable", len(self._unloaded), self.config.resume_dir)
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
        if self.config.resume_dir and not self._thread.is_alive():
            self._save_resumable()

    def _save_resumable(self) -> None:
        """Save every session that could be resumed (attached, detached or unloaded) for the next start."""
        held = [s for s in self._tokens.values() if s.id in self.runner.states or s.id in self.runner.unloaded]
        held.sort(key=lambda s: s.detached_at if s.detached_at is not None else float("inf"))  # newest last
        held = held[-self.config.max_resumable_sessions :] if self.config.max_resumable_sessions else []
        try:
            saved = save_sessions(self.config.resume_dir, [(s, self.runner.host_state(s)) for s in held],
                                  replace_all=not self.config.shared_resume_dir)  # fmt: skip
        except Exception:  # noqa: BLE001 - a failed save loses resumability, never the shutdown
            log.exception("saving resumable sessions to %s failed", self.config.resume_dir)
            return
        if saved:
            log.info("%d resumable sessions saved to %s", saved, self.config.resume_dir)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- API -------------------------------------------------------------------------------------------

    async def start_session(self, params: SessionParams, *, auto_ack: bool = True, client: str | None = None,
                            resumable: bool = False, owner: str | None = None) -> SessionHandle:  # fmt: skip
        """Queue a session; raises ServerBusy when it cannot even wait. `auto_ack`: see `SessionHandle`; `client`:
        who asks (an address), so that admission is fair between clients; `resumable`: its consumer may detach and
        resume it (with `handle.info.resume_token`), `owner` being whose key may."""
        if not self.alive:
            raise RuntimeError("engine is not running")
        height, width = self.pipe.frame_size
        if params.image is not None and tuple(params.image.shape) != (height, width, 3):
            raise ValueError(f"image must be {(height, width, 3)}, got {tuple(params.image.shape)}")
        if params.rows > self.config.max_sessions:
            raise ValueError(f"a guided session holds {params.rows} cache streams, more than this server's "
                             f"max_sessions ({self.config.max_sessions}); use guidance_scale 1")  # fmt: skip
        session = Session(params, created_at=self.clock(), client=client, owner=owner)
        if self.config.id_prefix:
            session.id = f"{self.config.id_prefix}-{session.id}"
            session.resume_token = f"{self.config.id_prefix}.{session.resume_token}"
        encoder, handle = self._new_handle(session, auto_ack, first_frame=0, resumable=resumable)
        with self._cond:
            if not self.scheduler.add(session):
                self.stats.sessions_total["rejected"] += 1
                kind = "live" if session.is_live else "background"
                raise ServerBusy(f"server busy: too many {kind} sessions waiting")
            self._live[session.id] = _Live(session, handle, encoder)
            if resumable:
                self._tokens[session.resume_token] = session
            self._cond.notify_all()
        return handle

    def _new_handle(self, session: Session, auto_ack: bool, first_frame: int,
                    resumable: bool = True) -> tuple[ClipEncoder | None, SessionHandle]:  # fmt: skip
        height, width = self.pipe.frame_size
        fmt = session.params.format
        encoder = None if fmt == "raw" else make_encoder(fmt, width, height, self.fps)
        info = StreamInfo(
            session_id=session.id,
            width=width,
            height=height,
            fps=self.fps,
            chunk_frames=self.chunk_frames,
            format=fmt,
            mime=None if encoder is None else encoder.mime,
            init_segment=None if encoder is None else encoder.init_segment(),
            resume_token=session.resume_token if resumable else None,
            first_frame=first_frame,
        )
        return encoder, SessionHandle(self, session, info, asyncio.get_running_loop(), auto_ack=auto_ack)

    async def resume(self, token: str, from_frame: int, *, owner: str | None = None, auto_ack: bool = True,
                     client: str | None = None) -> SessionHandle:  # fmt: skip
        """A new handle for the session of `token`, from frame `from_frame` on (its consumer has every frame before
        it). Raises SessionFailed: `invalid_request` (unknown token, another owner's, a frame the session does not
        hold), `expired` (the session was dropped), `server_busy` (an unloaded session found no place to wait)."""
        with self._cond:
            session = self._tokens.get(token)
        adopted = None
        if session is None and self.config.shared_resume_dir and self.config.resume_dir:
            adopted = await asyncio.to_thread(take_saved, self.config.resume_dir, token)  # another engine's session
            session = adopted[0] if adopted else None
        if session is None or session.owner != owner:
            if token in self._expired_tokens:
                raise SessionFailed("expired", "the session is no longer held: start a new one")
            if adopted is not None:  # not this owner's: back where it was, for its owner
                await asyncio.to_thread(save_sessions, self.config.resume_dir, [adopted], False)
            raise SessionFailed("invalid_request", "unknown resume token")
        if adopted is not None and not session.first_held_frame <= from_frame <= session.frames_done:
            await asyncio.to_thread(save_sessions, self.config.resume_dir, [adopted], False)  # left as it was
            raise SessionFailed("invalid_request", f"from_frame must be in [{session.first_held_frame}, "
                                f"{session.frames_done}]: the frames this session still holds")  # fmt: skip
        if adopted is not None and self.config.id_prefix:  # it lives here now: a token that routes a resume here
            session.resume_token = f"{self.config.id_prefix}.{secrets.token_urlsafe(24)}"
        if session.client != client:
            session.client = client  # fairness counts it for the address it now streams to
        encoder, handle = self._new_handle(session, auto_ack, first_frame=from_frame)
        done: Future[SessionHandle] = Future()

        def resume() -> None:
            if adopted is not None:
                self._adopt(*adopted)
            self._resume(session, from_frame, encoder, handle, done)

        self._call_soon(resume)
        return await asyncio.wrap_future(done)

    def _adopt(self, session: Session, state: HostState) -> None:
        """Hold `session` (saved by this or another engine) as unloaded: resumable, its cache rebuilt when it is."""
        session.state, session.detached_at = SessionState.UNLOADED, self.clock()
        self.runner.restore(session, state)
        self._unloaded[session.id] = session
        self._unloaded_bytes[session.id] = state.nbytes + session.unacked_nbytes
        self._live[session.id] = _Live(session, None, None)
        self._tokens[session.resume_token] = session

    def detach(self, handle: SessionHandle) -> None:
        """The consumer behind `handle` left without stopping: keep the session for a resume (a no-op for a handle
        the session no longer has; at shutdown the engine saves what it holds anyway)."""
        with self._cond:
            if self._running:
                self._actions.append(lambda: self._detach(handle))
                self._cond.notify_all()

    def _call_soon(self, action: Callable[[], None]) -> None:
        with self._cond:
            if not self._running:
                raise RuntimeError("engine is not running")
            self._actions.append(action)
            self._cond.notify_all()

    def cancel(self, session: Session, handle: SessionHandle | None = None) -> None:
        """End the session (at the next step boundary). With `handle`: only if that is still the session's consumer
        (a connection that was replaced by a resume cannot cancel it)."""
        with self._cond:
            live = self._live.get(session.id)
            if handle is not None and (live is None or live.handle is not handle):
                return
            if not session.state.is_finished:
                session.cancel_requested = True
                self._cond.notify_all()

    def set_prompt(self, session: Session, prompt: Prompt, recache: bool = False,
                   handle: SessionHandle | None = None) -> None:  # fmt: skip
        """Condition the session on `prompt` from its next chunk on; `recache`: rewrite its cached frames' K/V under
        it too (see `ModelRunner.set_prompt`). The session keeps its guidance scale (it decides the session's rows):
        `prompt`'s own is replaced. Raises ValueError for a model without text. With `handle`: only if that is still
        the session's consumer."""
        if not self.pipe.config.takes_text:
            raise ValueError(f"model {self.pipe.name} takes no text prompt")
        first = session.params.prompt
        prompt = replace(prompt, guidance_scale=first.guidance_scale if first is not None else 1.0)
        with self._cond:
            live = self._live.get(session.id)
            if session.state.is_finished or (handle is not None and (live is None or live.handle is not handle)):
                return
        self._call_soon(lambda: self._switch_prompt(session, prompt, recache))

    def _switch_prompt(self, session: Session, prompt: Prompt, recache: bool) -> None:
        """Engine thread: a switch that fails (a device error copying the prompt, say) fails its session alone."""
        if session.state.is_finished:
            return
        try:
            self.runner.set_prompt(session, prompt, recache)
            self.stats.prompt_switches["recache" if recache else "keep"] += 1  # switches taken, not asked for
        except Exception as exc:
            log.error("prompt switch failed for session %s", session.id, exc_info=exc)
            session.error = f"prompt switch failed: {type(exc).__name__}: {exc}"
            self.cancel(session)
            live = self._live.get(session.id)
            if live is not None and live.handle is not None:
                live.handle.deliver(SessionFailed("internal", session.error))

    @property
    def num_active(self) -> int:
        return self.scheduler.num_active

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_paused(self) -> int:
        return sum(s.state is SessionState.PAUSED for s in list(self.scheduler.active))

    @property
    def num_detached(self) -> int:
        return sum(s.state is SessionState.DETACHED for s in list(self.scheduler.active))

    @property
    def num_resumable(self) -> int:
        return len(self._unloaded)

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
                    while self._actions:
                        self._actions.popleft()()
                    self._drop_unloaded()
                    cancelled = self.scheduler.take_cancelled()
                    plan = self.scheduler.schedule()
                    if plan.is_empty and not cancelled and not self._actions:
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
        for s in plan.unload:  # before the prefill, which may need their pages
            self.runner.unload(s)
            for clip in s.unacked_clips():  # host memory: keep the frames, encode them again if resent
                clip.media = []
            self._unloaded[s.id] = s
            self._unloaded_bytes[s.id] = self.runner.unloaded[s.id].nbytes + s.unacked_nbytes
            log.info("session %s unloaded (detached %.1f s); resumable by a rebuild", s.id,
                     self.clock() - (s.detached_at or 0.0))  # fmt: skip
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
            s.state, s.clip_started_at, s.steps_left = SessionState.GENERATING, now, self.runner.steps_left(s)
            if f is not None:
                self._emit(s, f, gen_ms=(now - s.created_at) * 1e3, generated=False)
            if s.id in self._live and self._live[s.id].handle is None:  # its consumer left while it was admitted
                self._detach_now(s)

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
        s.add_unacked(clip.end_frame, clip)
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
        """Encode on the worker pool, after the session's previous clip; a detached session's clip waits, encoded,
        among its unacknowledged clips for a resume."""
        live = self._live[s.id]
        encoder, handle = live.encoder, live.handle

        def job() -> None:
            try:
                if encoder is not None:
                    clip.media = encoder.encode(clip.frames, clip.first_frame)
                    s.add_unacked_bytes(clip.end_frame, sum(map(len, clip.media)))
            except Exception as exc:  # fails this session only; the engine thread ends it at the next step
                self._encode_failed(s, handle, exc)
                return
            if handle is not None:
                handle.deliver(clip)

        self._chain(live, job)

    def _chain(self, live: _Live, job: Callable[[], None]) -> None:
        """Run `job` on the worker pool after the session's previous job (its clips leave in order)."""
        previous = live.tail

        def chained() -> None:
            if previous is not None:
                previous.result()
            job()

        live.tail = self._pool.submit(chained)

    def _encode_failed(self, s: Session, handle: SessionHandle | None, exc: Exception) -> None:
        log.error("encoding failed for session %s", s.id, exc_info=exc)
        s.error = f"encoding failed: {type(exc).__name__}: {exc}"
        self.cancel(s)
        if handle is not None:
            handle.deliver(SessionFailed("internal", s.error))

    # ---- detaching and resuming (engine thread) ---------------------------------------------------------------

    def _detach(self, handle: SessionHandle) -> None:
        s = handle.session
        live = self._live.get(s.id)
        if live is None or live.handle is not handle or s.state.is_finished:
            return
        live.handle = None
        if s.state is SessionState.WAITING and s.id in self.runner.unloaded:  # waiting for its rebuild
            self.scheduler.remove(s)
            s.state, s.detached_at = SessionState.UNLOADED, self.clock()
            self._unloaded[s.id] = s
        elif s.state is SessionState.WAITING:  # nothing generated yet: nothing to resume
            s.cancel_requested = True
        elif s.state is not SessionState.PREFILLING:  # a prefilling one detaches once its prefill is done
            self._detach_now(s)

    def _detach_now(self, s: Session) -> None:
        s.state, s.detached_at, s.paused_since = SessionState.DETACHED, self.clock(), None
        s.clock_start = None  # the viewer's clock restarts with the first clip after a resume
        log.info("session %s detached at frame %d (%d acknowledged)", s.id, s.frames_done, s.acked_frames)

    def _resume(self, s: Session, from_frame: int, encoder: ClipEncoder | None, handle: SessionHandle,
                done: Future[SessionHandle]) -> None:  # fmt: skip
        live = self._live.get(s.id)
        if s.state.is_finished or live is None:
            done.set_exception(SessionFailed("expired", "the session has ended: start a new one"))
            return
        if not s.first_held_frame <= from_frame <= s.frames_done:
            done.set_exception(SessionFailed("invalid_request", f"from_frame must be in [{s.first_held_frame}, "
                                             f"{s.frames_done}]: the frames this session still holds"))  # fmt: skip
            return
        if s.state is SessionState.UNLOADED:
            s.state, s.created_at = SessionState.WAITING, self.clock()
            if not self.scheduler.add(s):
                s.state = SessionState.UNLOADED
                done.set_exception(SessionFailed("server_busy", "server busy: too many sessions waiting"))
                return
            del self._unloaded[s.id]
            self._unloaded_bytes.pop(s.id, None)
            self.stats.resumes["rebuilt"] += 1
        else:
            self.stats.resumes["exact"] += 1
        if live.handle is not None:  # still attached (its client has not noticed the drop): the new one takes over
            old = live.handle
            self._chain(live, lambda: old.deliver(SessionFailed("replaced", "the session was resumed elsewhere")))
        if s.state is SessionState.DETACHED:
            s.state = SessionState.GENERATING  # paused again at once if its unacknowledged clips are too many
        s.detached_at, s.clock_start = None, None
        s.ack(from_frame)
        live.handle, live.encoder = handle, encoder
        replay = [c for c in s.unacked_clips() if c.end_frame > from_frame]
        fmt = s.params.format

        def resend() -> None:
            for clip in replay:
                try:
                    out = trim_clip(clip, from_frame, fmt, encoder)
                except Exception as exc:  # noqa: BLE001 - fails this session only
                    self._encode_failed(s, handle, exc)
                    return
                handle.deliver(out)

        self._chain(live, resend)
        log.info("session %s resumed from frame %d (%d clips resent)", s.id, from_frame, len(replay))
        done.set_result(handle)

    def _drop_unloaded(self) -> None:
        """Unloaded sessions past `resume_keep_s`, or beyond `max_resumable_sessions` or `max_resumable_bytes`
        (oldest first), are dropped."""
        now, cfg = self.clock(), self.config
        while self._unloaded:
            s = next(iter(self._unloaded.values()))
            within = (
                len(self._unloaded) <= cfg.max_resumable_sessions and self.resumable_bytes <= cfg.max_resumable_bytes
            )
            if within and now - s.detached_at < cfg.resume_keep_s:  # type: ignore[operator]
                break
            self._finish(s, SessionState.CANCELLED)

    @property
    def resumable_bytes(self) -> int:
        """Host memory held by unloaded sessions."""
        return sum(self._unloaded_bytes.values())

    def _forget(self, s: Session, expired: bool) -> None:
        """The session can no longer be resumed."""
        if self._tokens.pop(s.resume_token, None) is not None and expired:
            self.stats.resume_expired += 1
            self._expired_tokens[s.resume_token] = None
            while len(self._expired_tokens) > 4096:
                self._expired_tokens.popitem(last=False)

    def _finish(self, s: Session, state: SessionState, error: str | None = None, code: str = "internal") -> None:
        """End a session: free its pages at once, tell its consumer after its last clip."""
        was_detached = s.state.is_detached
        s.state, s.error, s.error_code = state, error, code
        self.runner.release(s)
        self._unloaded.pop(s.id, None)
        self._unloaded_bytes.pop(s.id, None)
        self._forget(s, expired=was_detached)
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

        handle = live.handle
        if handle is not None:
            self._chain(live, lambda: handle.deliver(event))
