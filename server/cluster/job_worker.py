"""Runs the cluster's jobs on one engine replica: claims queued jobs from the shared store while it has room, runs
each as the single server's `JobRunner` does (a pace "max" session, the MP4 encoded as clips arrive), publishes it.

On the replica's asyncio loop. One loop task claims (up to `max_running` jobs at once, only while the engine lives)
and heartbeats every `heartbeat_s`: a job whose row is no longer this worker's (cancelled, deleted, requeued after a
missed lease) is stopped, and every heartbeat also requeues any worker's jobs whose lease ran out, so a dead
replica's jobs run elsewhere. It wakes early on a NOTIFY from `create` or a job finishing here, and polls every
`poll_s` otherwise. `stop` puts unfinished jobs back in the queue without counting an attempt: they run again
elsewhere from the start (a job's video is deterministic in its seed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from ca2vdm.server.api.jobs import Job
from ca2vdm.server.api.requests import lower_thread_priority
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.session import Prompt, SessionParams
from ca2vdm.server.media import Mp4Writer

from .pg_jobs import PgJobStore

log = logging.getLogger("ca2vdm.jobs")
T = TypeVar("T")


class JobWorker:
    """One replica's job runner over the shared store (see the module docstring); `worker_id`: the replica's id."""

    def __init__(self, store: PgJobStore, engine: Engine, worker_id: str, max_running: int, heartbeat_s: float = 2.0,
                 lease_s: float = 15.0, poll_s: float = 2.0) -> None:  # fmt: skip
        if lease_s <= heartbeat_s:
            raise ValueError(f"lease_s ({lease_s}) must be longer than heartbeat_s ({heartbeat_s})")
        self.store, self.engine, self.worker_id = store, engine, worker_id
        self.max_running, self.heartbeat_s, self.lease_s, self.poll_s = max_running, heartbeat_s, lease_s, poll_s
        self._tasks: dict[str, asyncio.Task[None]] = {}  # job id -> its run
        self._wake = asyncio.Event()  # a job may be waiting, or a slot came free
        self._claiming = False
        self._pause_until = 0.0  # the engine said it was busy: no claims before this
        self._loops: list[asyncio.Task[None]] = []
        self._dir = Path(tempfile.mkdtemp(prefix="ca2vdm-jobs-"))  # MP4s being written
        # MP4 encoding (and progress updates): background work, on a thread of lower priority than the engine
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ca2vdm-job-encode",
                                           initializer=lower_thread_priority)  # fmt: skip

    @property
    def running(self) -> set[str]:
        """Ids of the jobs running here."""
        return set(self._tasks)

    async def start(self) -> None:
        self._claiming = True
        self._loops = [asyncio.create_task(self._loop(), name=f"jobs-{self.worker_id}"),
                       asyncio.create_task(self._listen(), name=f"jobs-listen-{self.worker_id}")]  # fmt: skip

    async def stop(self, drain_s: float = 0.0, *, release: bool = True) -> None:
        """Claim nothing more, let running jobs finish for up to `drain_s` (heartbeats go on), then stop the rest
        and put them back in the queue. `release=False` leaves them to the lease instead (what a crash does)."""
        self._claiming = False
        if self._tasks and drain_s > 0:
            await asyncio.wait(list(self._tasks.values()), timeout=drain_s)
        tasks = [*self._loops, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self._encoder.shutdown, True)  # a publish under way finishes first
        if release:
            n = await self._guard(self.store.release, self.worker_id)
            if n:
                log.info("worker %s stopped: %d job(s) back in the queue", self.worker_id, n)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _guard(self, fn: Callable[..., T], *args: object) -> T | None:
        """`fn(*args)` on a thread; None (logged) when it fails: the loop goes on, leases cover what it missed."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception:  # noqa: BLE001 - a database or store hiccup must not end the worker
            log.exception("worker %s: %s failed", self.worker_id, getattr(fn, "__name__", fn))
            return None

    async def _loop(self) -> None:
        beat_at = 0.0
        while True:
            self._wake.clear()
            if time.monotonic() >= beat_at:
                beat_at = time.monotonic() + self.heartbeat_s
                await self._beat()
            free = self.max_running - len(self._tasks)
            if free > 0 and self._claiming and self.engine.alive and time.monotonic() >= self._pause_until:
                for job in await self._guard(self.store.claim, self.worker_id, free) or []:
                    self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            timeout = max(0.0, min(self.poll_s, beat_at - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _beat(self) -> None:
        for job_id in await self._guard(self.store.heartbeat, self.worker_id, list(self._tasks)) or ():
            task = self._tasks.get(job_id)
            if task is not None:
                log.info("job %s was cancelled, deleted or taken over: stopping it here", job_id)
                task.cancel()
        await self._guard(self.store.requeue_stale, self.lease_s)

    async def _listen(self) -> None:
        async for _ in self.store.notifications(retry_s=self.poll_s):
            self._wake.set()

    async def _prompt(self, job: Job) -> Prompt | None:
        """The job's prompt, encoded by this replica's text encoder (ValueError: it cannot be)."""
        if job.prompt is None:
            return None
        pipe = self.engine.pipe
        if pipe.text is None:
            raise ValueError(f"model {pipe.name} takes no text prompt")
        features = await asyncio.to_thread(pipe.text.encode, job.prompt)
        scale = pipe.config.guidance_scale if job.guidance_scale is None else job.guidance_scale
        return Prompt(job.prompt, features.y, features.mask, scale)

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        handle = None
        writer: Mp4Writer | None = None
        try:
            image = await asyncio.to_thread(self.store.image, job.id)
            params = SessionParams(image=image, seed=job.seed, sampler=job.sampler, steps=job.steps,
                                   num_frames=job.num_frames, format="raw", pace="max",
                                   prompt=await self._prompt(job))  # fmt: skip
            handle = await self.engine.start_session(params)
            writer = Mp4Writer(self._dir / f"{job.id}.mp4", self.engine.pipe.config.fps, threads=1)
            async for clip in handle:
                if not await loop.run_in_executor(self._encoder, self._append, job, writer, clip.frames):
                    log.info("job %s was cancelled, deleted or taken over: stopping it here", job.id)
                    handle.cancel()
                    return
            tmp = await loop.run_in_executor(self._encoder, writer.close)
            writer = None
            await loop.run_in_executor(self._encoder, self._publish, job.id, tmp)
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()
            raise
        except ServerBusy:  # this engine is full: another may have room
            self._pause_until = time.monotonic() + self.poll_s
            await self._guard(self.store.release, self.worker_id, [job.id])
        except (SessionFailed, OSError, RuntimeError, ValueError) as exc:
            if self.engine.alive:
                log.exception("job %s failed", job.id)
                await self._guard(self.store.fail, job.id, str(exc))
            else:  # the replica's fault, not the job's: it runs elsewhere (an attempt counted)
                log.error("job %s stopped by the engine's failure (%s): back in the queue", job.id, exc)
                await self._guard(lambda: self.store.release(self.worker_id, [job.id], count_attempt=True))
        except Exception:  # noqa: BLE001 - the store failed (the database is down?): the lease requeues the job
            log.exception("job %s: the store failed; it runs again after its lease", job.id)
        finally:
            if writer is not None:
                writer.abort()
            self._tasks.pop(job.id, None)
            self._wake.set()

    def _append(self, job: Job, writer: Mp4Writer, frames: torch.Tensor) -> bool:
        """Encode a clip and record the progress; False when the job is no longer this worker's."""
        writer.append(frames)
        try:
            return self.store.progress(self.worker_id, job.id, min(99, 100 * writer.num_frames // job.num_frames))
        except Exception:  # noqa: BLE001 - a missed progress update is not worth the job; heartbeats go on
            log.warning("job %s: progress update failed", job.id, exc_info=True)
            return True

    def _publish(self, job_id: str, mp4: Path) -> None:
        try:
            if not self.store.complete(job_id, mp4):
                log.info("job %s finished after it was deleted or cancelled: video discarded", job_id)
        finally:
            mp4.unlink(missing_ok=True)
