"""Video jobs that survive restarts: SQLite rows + MP4 files under `--data-dir`.

A job runs as an engine session (raw frames) and its MP4 is written to a temporary name and renamed when
complete, so a file under its final name is always whole. On start, jobs left queued or in progress by a
process that died are marked failed: nothing half-written is ever served.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.media import write_mp4

log = logging.getLogger("ca2vdm.jobs")

_COLUMNS = "id, status, progress, num_frames, seed, sampler, steps, created_at, completed_at, error"


@dataclass
class Job:
    id: str
    status: str  # queued | in_progress | completed | failed | cancelled
    progress: int
    num_frames: int
    seed: int
    sampler: str
    steps: int
    created_at: float
    completed_at: float | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {"object": "video", **asdict(self)}


class JobStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        (self.dir / "videos").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, progress INTEGER NOT NULL,"
            " num_frames INTEGER NOT NULL, seed INTEGER NOT NULL, sampler TEXT NOT NULL, steps INTEGER NOT NULL,"
            " created_at REAL NOT NULL, completed_at REAL, error TEXT)"
        )
        with self._lock:  # a previous process died with these running: never serve them half-done
            self._db.execute(
                "UPDATE jobs SET status='failed', error='server restarted while the job was running', completed_at=?"
                " WHERE status IN ('queued', 'in_progress')",
                (time.time(),),
            )
        for tmp in (self.dir / "videos").glob("*.tmp*"):
            tmp.unlink(missing_ok=True)

    def path(self, job_id: str) -> Path:
        return self.dir / "videos" / f"{job_id}.mp4"

    def create(self, num_frames: int, seed: int, sampler: str, steps: int) -> Job:
        job = Job(f"video_{uuid.uuid4().hex}", "queued", 0, num_frames, seed, sampler, steps, time.time())
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", tuple(asdict(job).values()))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def list(self, limit: int, after: str | None) -> list[Job]:
        with self._lock:
            if after is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT ?", (limit,))
            else:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE (created_at, id) < (SELECT created_at, id FROM jobs WHERE id=?)"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (after, limit),
                )
            return [Job(*r) for r in rows.fetchall()]

    def update(self, job_id: str, **fields: object) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self.path(job_id).unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()


class JobRunner:
    """Runs jobs on the engine, one asyncio task each; keeps the store in step."""

    def __init__(self, store: JobStore, engine: Engine) -> None:
        self.store, self.engine = store, engine
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, job: Job, image: torch.Tensor | None) -> None:
        self._tasks[job.id] = asyncio.create_task(self._run(job, image))

    def cancel(self, job_id: str) -> bool:
        task = self._tasks.pop(job_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _run(self, job: Job, image: torch.Tensor | None) -> None:
        params = SessionParams(image=image, seed=job.seed, sampler=job.sampler, steps=job.steps,
                               num_frames=job.num_frames, format="raw")  # fmt: skip
        handle = None
        try:
            while handle is None:
                try:
                    handle = await self.engine.start_session(params)
                except ServerBusy:
                    await asyncio.sleep(1.0)  # stays queued until the engine has room
            self.store.update(job.id, status="in_progress")
            clips = []
            async for clip in handle:
                clips.append(clip.frames)
                done = sum(c.shape[0] for c in clips)
                self.store.update(job.id, progress=min(99, 100 * done // job.num_frames))
            frames = torch.cat(clips)
            await asyncio.to_thread(write_mp4, self.store.path(job.id), frames, self.engine.pipe.config.fps)
            self.store.update(job.id, status="completed", progress=100, completed_at=time.time())
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()
            if self.store.get(job.id) is not None:
                self.store.update(job.id, status="cancelled", completed_at=time.time())
            raise
        except (SessionFailed, OSError, RuntimeError, ValueError) as exc:
            log.exception("job %s failed", job.id)
            self.store.update(job.id, status="failed", error=str(exc), completed_at=time.time())
        finally:
            self._tasks.pop(job.id, None)
