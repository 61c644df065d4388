"""Runs the job store's jobs on the engine: one asyncio task per job, at most `max_running_jobs` at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.media import Mp4Writer
from ca2vdm.server.model.prompt import Prompt

from .jobs import Job, JobQueueFull, JobStore
from .requests import Reject, lower_thread_priority

log = logging.getLogger("ca2vdm.jobs")


PromptFn = Callable[..., Awaitable[Prompt | None]]  # (text, guidance_scale, queued=...) -> Prompt


class JobRunner:
    def __init__(self, store: JobStore, engine: Engine, max_queued: int, max_running: int,
                 prompt: PromptFn | None = None) -> None:  # fmt: skip
        """`prompt`: a job's prompt text and guidance scale -> the engine's Prompt (`RequestDecoder.prompt`: the
        text encoder, whose LRU holds what the request encoded), for jobs of text-conditioned models."""
        self.store, self.engine = store, engine
        self._prompt = prompt
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_running)  # a job waits here for its turn: no polling
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        # MP4 encoding of jobs: background work, on threads of lower priority than the engine
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ca2vdm-job-encode",
                                           initializer=lower_thread_priority)  # fmt: skip

    @property
    def num_queued(self) -> int:
        """Jobs queued or running (what `max_queued_jobs` bounds)."""
        return len(self._tasks)

    def check_room(self) -> None:
        if len(self._tasks) >= self.max_queued:
            raise JobQueueFull(f"{len(self._tasks)} jobs are queued or running, the limit is {self.max_queued}")

    def submit(self, job: Job, image: torch.Tensor | None) -> None:
        self.check_room()
        self._tasks[job.id] = asyncio.create_task(self._run(job, image), name=f"job-{job.id}")

    def resume(self) -> int:
        """Queue again the jobs a previous process left queued or running (the store reset the latter); returns
        how many."""
        jobs = self.store.queued()
        for job in jobs:
            self._tasks[job.id] = asyncio.create_task(self._run(job, self.store.image(job.id)), name=f"job-{job.id}")
        if jobs:
            log.info("resuming %d job(s) left by the previous process", len(jobs))
        return len(jobs)

    def cancel(self, job_id: str) -> bool:
        task = self._tasks.pop(job_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def shutdown(self) -> None:
        """Stop every job; those queued or running stay queued in the store and run on the next start."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._encoder.shutdown(wait=True)
        if tasks:
            log.info("%d job(s) stopped by shutdown stay queued for the next start", len(tasks))

    async def _run(self, job: Job, image: torch.Tensor | None) -> None:
        handle = None
        writer: Mp4Writer | None = None
        try:
            async with self._slots:  # the prompt is encoded in the job's slot: at most max_running_jobs at once
                prompt = None
                if job.prompt is not None:
                    if self._prompt is None:
                        raise ValueError("this server cannot encode the job's prompt")
                    try:
                        prompt = await self._prompt(job.prompt, job.guidance_scale, queued=True)
                    except Reject as exc:
                        raise ValueError(str(exc)) from exc
                params = SessionParams(image=image, seed=job.seed, sampler=job.sampler, steps=job.steps,
                                       num_frames=job.num_frames, format="raw", pace="max", prompt=prompt)  # fmt: skip
                handle = await self.engine.start_session(params)
                self.store.update(job.id, status="in_progress")
                writer = Mp4Writer(self.store.path(job.id), self.engine.pipe.config.fps, threads=1)  # background
                loop = asyncio.get_running_loop()
                async for clip in handle:
                    await loop.run_in_executor(self._encoder, writer.append, clip.frames)
                    self.store.update(job.id, progress=min(99, 100 * writer.num_frames // job.num_frames))
                await loop.run_in_executor(self._encoder, self.store.complete, job.id, writer)
                writer = None
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()
            if self._closing:  # back to the queue: it runs again, from the start, on the next start
                self.store.update(job.id, status="queued", progress=0)
            elif self.store.get(job.id) is not None:
                self.store.update(job.id, status="cancelled", completed_at=time.time())
            raise
        except (SessionFailed, ServerBusy, OSError, RuntimeError, ValueError) as exc:
            log.exception("job %s failed", job.id)
            self.store.update(job.id, status="failed", error=str(exc), completed_at=time.time())
        finally:
            if writer is not None:
                writer.abort()
            self._tasks.pop(job.id, None)
