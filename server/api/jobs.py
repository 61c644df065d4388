"""Video jobs that survive restarts: SQLite rows, their condition images and MP4 files under `--data-dir`.

A job runs as a background engine session (pace "max": spare capacity only) and its frames are encoded into the MP4
as clips arrive (constant memory whatever its length). The file is written under a temporary name and published
(renamed) in the same store transaction that marks the job completed, and a DELETE removes row, input and file in
one transaction too, so a deleted job never leaves a file and a completed job always has one.

Nothing is lost: the condition image is kept beside the job, and a job that was queued or running when the process
stopped (SIGTERM, or a crash) runs again on the next start from the beginning (generation is deterministic in its
seed, so the video is the same). A job interrupted `max_attempts` times is failed with a message saying so.
The queue is bounded (`max_queued_jobs`, then 429); at most `max_running_jobs` run at once, each waiting for its
turn on a semaphore, not by polling.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from starlette.responses import FileResponse

from ca2vdm.server.media import Mp4Writer

log = logging.getLogger("ca2vdm.jobs")

_COLUMNS = (
    "id, status, progress, num_frames, seed, sampler, steps, created_at, completed_at, error, prompt, guidance_scale"
)


class JobQueueFull(RuntimeError):
    """`max_queued_jobs` jobs are already queued or running."""


JOB_ID_PATTERN = r"^video_[0-9a-f]{30}$"  # what new_job_id makes (a list cursor must look like one)


def new_job_id() -> str:
    """`video_` + microseconds since the epoch (14 hex digits) + 64 random bits: ids sort by creation time, so a
    list cursor stays valid after its job is deleted."""
    return f"video_{time.time_ns() // 1000:014x}{secrets.token_hex(8)}"


def _id_time(job_id: str) -> float | None:
    try:
        return int(job_id[6:20], 16) / 1e6 if job_id.startswith("video_") and len(job_id) == 36 else None
    except ValueError:
        return None


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
    prompt: str | None = None  # text-conditioned models (encoded again when the job runs)
    guidance_scale: float | None = None

    def to_json(self) -> dict:
        return {"object": "video", **asdict(self)}


class JobStore:
    """The jobs table and the files beside it. Every method is one transaction under one lock."""

    def __init__(self, data_dir: Path, max_attempts: int = 3) -> None:
        self.dir = Path(data_dir)
        for sub in ("videos", "inputs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, progress INTEGER NOT NULL,"
            " num_frames INTEGER NOT NULL, seed INTEGER NOT NULL, sampler TEXT NOT NULL, steps INTEGER NOT NULL,"
            " created_at REAL NOT NULL, completed_at REAL, error TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "attempts" not in columns:  # a store made before jobs were resumable: its unfinished jobs kept no input
            self._db.execute(
                "UPDATE jobs SET status='failed', error='server restarted while the job was running', completed_at=?"
                " WHERE status IN ('queued', 'in_progress')",
                (time.time(),),
            )
            self._db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            self._db.execute("ALTER TABLE jobs ADD COLUMN has_image INTEGER NOT NULL DEFAULT 0")
        if "prompt" not in columns:  # a store made before text-conditioned models
            self._db.execute("ALTER TABLE jobs ADD COLUMN prompt TEXT")
            self._db.execute("ALTER TABLE jobs ADD COLUMN guidance_scale REAL")
        self._recover(max_attempts)

    def _recover(self, max_attempts: int) -> None:
        """After a stop or a crash: jobs that were running count an interrupted attempt, and run again unless they
        have used up their attempts or their input is gone; no temporary or orphaned file survives."""
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE jobs SET attempts = attempts + 1, status = 'queued', progress = 0"
                             " WHERE status = 'in_progress'")  # fmt: skip
            self._db.execute(
                "UPDATE jobs SET status='failed', completed_at=?, error=? WHERE status='queued' AND attempts >= ?",
                (now, f"the server stopped while this job ran, {max_attempts} times: not retried again", max_attempts),
            )
            ids = {r[0] for r in self._db.execute("SELECT id FROM jobs")}
            for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE status='queued' AND has_image=1").fetchall():
                if not self.input_path(job_id).is_file():
                    self._db.execute("UPDATE jobs SET status='failed', completed_at=?, error=? WHERE id=?",
                                     (now, "the job's input image was lost; resubmit it", job_id))  # fmt: skip
        for sub in ("videos", "inputs"):
            for path in (self.dir / sub).iterdir():
                if path.name.startswith(".") or path.stem not in ids:
                    path.unlink(missing_ok=True)

    def path(self, job_id: str) -> Path:
        return self.dir / "videos" / f"{job_id}.mp4"

    def input_path(self, job_id: str) -> Path:
        return self.dir / "inputs" / f"{job_id}.png"

    def create(self, num_frames: int, seed: int, sampler: str, steps: int, image: torch.Tensor | None,
               prompt: str | None = None, guidance_scale: float | None = None) -> Job:  # fmt: skip
        job = Job(new_job_id(), "queued", 0, num_frames, seed, sampler, steps, time.time(), prompt=prompt,
                  guidance_scale=guidance_scale)  # fmt: skip
        if image is not None:  # the decoded, model-sized image: what the job needs to run again after a restart
            Image.fromarray(image.numpy()).save(self.input_path(job.id), format="PNG")
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({_COLUMNS}, has_image) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                             (*asdict(job).values(), image is not None))  # fmt: skip
        return job

    def image(self, job_id: str) -> torch.Tensor | None:
        path = self.input_path(job_id)
        if not path.is_file():
            return None
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB")))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(("queued", "in_progress", "completed", "failed", "cancelled"), 0)
        with self._lock:
            counts.update(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return counts

    def queued(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status='queued' ORDER BY created_at, id")
            return [Job(*r) for r in rows.fetchall()]

    def list(self, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first; `after`: the id of the last job of the previous page (it may have been deleted since).
        Returns the page and whether more follow. ValueError for a cursor that names no job and no time."""
        with self._lock:
            if after is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?",
                                        (limit + 1,))  # fmt: skip
            else:
                row = self._db.execute("SELECT created_at FROM jobs WHERE id=?", (after,)).fetchone()
                created = row[0] if row else _id_time(after)
                if created is None:
                    raise ValueError(f"unknown cursor {after!r}")
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE created_at < ? OR (created_at = ? AND id < ?)"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (created, created, after, limit + 1),
                )
            jobs = [Job(*r) for r in rows.fetchall()]
        return jobs[:limit], len(jobs) > limit

    def update(self, job_id: str, **fields: object) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))

    def complete(self, job_id: str, writer: Mp4Writer) -> bool:
        """Publish the finished file and mark the job completed, in one step; False (file discarded) when the job
        was deleted meanwhile."""
        tmp = writer.close()
        with self._lock:
            if self._db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None:
                tmp.unlink(missing_ok=True)
                return False
            tmp.replace(self.path(job_id))
            self._db.execute("UPDATE jobs SET status='completed', progress=100, completed_at=? WHERE id=?",
                             (time.time(), job_id))  # fmt: skip
        self.input_path(job_id).unlink(missing_ok=True)
        return True

    def content_response(self, job_id: str, range_header: str | None = None) -> FileResponse | None:
        """The finished MP4 as a response (FileResponse answers a Range header itself), or None without one."""
        path = self.path(job_id)
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4") if path.is_file() else None

    def delete(self, job_id: str) -> bool:
        with self._lock:
            gone = self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount > 0
            self.path(job_id).unlink(missing_ok=True)
            self.input_path(job_id).unlink(missing_ok=True)
        return gone

    def close(self) -> None:
        self._db.close()
