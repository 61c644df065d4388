"""Video jobs shared by the nodes of a cluster: rows in PostgreSQL, condition images and MP4s in an object store.

The same jobs and semantics as the single server's `JobStore` (server/api/jobs.py), with the work handed out instead
of run in-process: an engine replica's `JobWorker` claims the oldest queued jobs (`FOR UPDATE SKIP LOCKED`: two
workers never claim the same job), heartbeats each while it runs it, and publishes its MP4 with `complete`. A worker
that dies stops heartbeating; after `lease_s` any other worker puts its jobs back in the queue (`requeue_stale`),
counting an interrupted attempt, and fails a job interrupted `max_attempts` times: the single server's restart
recovery, per job. A worker that stops gracefully puts its jobs back without counting one (`release`). Cancelling
or deleting a job only changes its row; the worker holding it learns so at its next heartbeat and stops.

Wake-ups: `create` sends `NOTIFY ca2vdm_jobs` in its transaction and idle workers LISTEN (`notifications`), so a job
starts moments after its submit; workers also poll every few seconds, so a lost notification (a dropped listening
connection, a job requeued by a lease) costs at most that. LISTEN/NOTIFY needs nothing beside the database (no
broker), and a notification is only a hint: the rows are the truth.

Publishing: the MP4 is uploaded under a temporary key; then one transaction locks the row, checks that the job still
exists and still wants its video, copies the object to its final key and marks the job completed. A DELETE waits for
that lock and removes the objects after its commit, so a deleted job never leaves a video and a completed job always
has one. (A crash between upload and commit leaves a `tmp/` object behind: a bucket lifecycle rule on that prefix
clears them.)
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
import torch
from PIL import Image
from psycopg.pq import TransactionStatus
from starlette.responses import Response, StreamingResponse

from ca2vdm.server.api.jobs import _COLUMNS, Job, JobQueueFull, _id_time, new_job_id

from .objects import ObjectStore

log = logging.getLogger("ca2vdm.jobs")

CHANNEL = "ca2vdm_jobs"  # NOTIFY'd when a job is queued
_SCHEMA_LOCK = 0x43A2_5D4D  # advisory lock: nodes starting together create the table once
_UPDATABLE = {"status", "progress", "completed_at", "error"}
_ACTIVE = ("queued", "in_progress")


def _qualified(table: str) -> str:
    return ", ".join(f"{table}.{c.strip()}" for c in _COLUMNS.split(","))


def video_key(job_id: str) -> str:
    return f"videos/{job_id}.mp4"


def input_key(job_id: str) -> str:
    return f"inputs/{job_id}.png"


class _Pool:
    """A few connections for short transactions, each used by one thread at a time; a broken one is dropped and
    a new one made on the next call."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            finally:
                ok = not (self._closed or conn.closed or conn.broken)
                if ok and conn.info.transaction_status == TransactionStatus.IDLE:
                    with self._lock:
                        self._idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single range a `Range: bytes=...` header asks of `size` bytes, ends inclusive; None for the whole object
    (no header, one this does not read, several ranges: RFC 9110 lets a server ignore them). ValueError when the
    range starts past the end (416)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)-([0-9]*)\s*", header or "")
    if match is None or size == 0 or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if not first:  # bytes=-N: the last N bytes
        if int(last) == 0:
            raise ValueError("empty suffix range")
        return max(0, size - int(last)), size - 1
    start, end = int(first), int(last) if last else size - 1
    if last and start > end:  # not a valid range: ignored
        return None
    if start >= size:
        raise ValueError(f"range starts at {start}, the object has {size} bytes")
    return start, min(end, size - 1)


class PgJobStore:
    """The `jobs` table (the SQLite store's columns plus `attempts`, `has_image`, `worker`, `heartbeat_at`) and the
    objects beside it. Every method is one short transaction; safe to call from several threads."""

    def __init__(self, url: str, objects: ObjectStore, max_attempts: int = 3, lease_s: float = 15.0,
                 pool_size: int = 4) -> None:  # fmt: skip
        self.url, self.objects = url, objects
        self.max_attempts, self.lease_s = max_attempts, lease_s
        self._pool = _Pool(url, pool_size)
        with self._pool.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL,"
                " progress INTEGER NOT NULL, num_frames INTEGER NOT NULL, seed BIGINT NOT NULL, sampler TEXT NOT NULL,"
                " steps INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL, completed_at DOUBLE PRECISION,"
                " error TEXT, attempts INTEGER NOT NULL DEFAULT 0, has_image BOOLEAN NOT NULL DEFAULT FALSE,"
                " worker TEXT, heartbeat_at TIMESTAMPTZ)"
            )
            cur.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS prompt TEXT")  # text-conditioned models
            cur.execute("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS guidance_scale DOUBLE PRECISION")
            cur.execute("CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at, id)")
            cur.execute("CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status)")

    # what the REST routes use (JobStore's methods)

    def create(self, num_frames: int, seed: int, sampler: str, steps: int, image: torch.Tensor | None,
               prompt: str | None = None, guidance_scale: float | None = None) -> Job:  # fmt: skip
        """Queue a job (its condition image goes to the object store first) and wake the workers."""
        job = Job(new_job_id(), "queued", 0, num_frames, seed, sampler, steps, time.time(), prompt=prompt,
                  guidance_scale=guidance_scale)  # fmt: skip
        if image is not None:
            png = io.BytesIO()
            Image.fromarray(image.numpy()).save(png, format="PNG")
            self.objects.put_bytes(input_key(job.id), png.getvalue())
        with self._pool.transaction() as cur:
            cur.execute(f"INSERT INTO jobs ({_COLUMNS}, has_image) VALUES ({', '.join(['%s'] * 13)})",
                        (job.id, job.status, job.progress, job.num_frames, job.seed, job.sampler, job.steps,
                         job.created_at, job.completed_at, job.error, job.prompt, job.guidance_scale,
                         image is not None))  # fmt: skip
            cur.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
        return job

    def get(self, job_id: str) -> Job | None:
        with self._pool.transaction() as cur:
            row = cur.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return Job(*row) if row else None

    def list(self, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """Newest first; `after`: the id of the last job of the previous page (it may have been deleted since).
        Returns the page and whether more follow. ValueError for a cursor that names no job and no time."""
        with self._pool.transaction() as cur:
            if after is None:
                cur.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT %s", (limit + 1,))
            else:
                row = cur.execute("SELECT created_at FROM jobs WHERE id=%s", (after,)).fetchone()
                created = row[0] if row else _id_time(after)
                if created is None:
                    raise ValueError(f"unknown cursor {after!r}")
                cur.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE created_at < %s OR (created_at = %s AND id < %s)"
                    " ORDER BY created_at DESC, id DESC LIMIT %s",
                    (created, created, after, limit + 1),
                )
            jobs = [Job(*r) for r in cur.fetchall()]
        return jobs[:limit], len(jobs) > limit

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(("queued", "in_progress", "completed", "failed", "cancelled"), 0)
        with self._pool.transaction() as cur:
            counts.update(cur.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return counts

    def count_active(self) -> int:
        """Jobs queued or running (what `max_queued_jobs` bounds)."""
        with self._pool.transaction() as cur:
            return cur.execute("SELECT COUNT(*) FROM jobs WHERE status = ANY(%s)", (list(_ACTIVE),)).fetchone()[0]

    def queued(self) -> list[Job]:
        with self._pool.transaction() as cur:
            rows = cur.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status='queued' ORDER BY created_at, id")
            return [Job(*r) for r in rows.fetchall()]

    def update(self, job_id: str, **fields: object) -> None:
        if not fields or not set(fields) <= _UPDATABLE:
            raise ValueError(f"can update {sorted(_UPDATABLE)}, not {sorted(set(fields) - _UPDATABLE)}")
        sets = ", ".join(f"{k}=%s" for k in fields)  # names from _UPDATABLE only
        with self._pool.transaction() as cur:
            cur.execute(f"UPDATE jobs SET {sets} WHERE id=%s", (*fields.values(), job_id))

    def image(self, job_id: str) -> torch.Tensor | None:
        """The job's condition image; None if it has none. FileNotFoundError if its image was lost."""
        data = self.objects.get_bytes(input_key(job_id))
        if data is None:
            with self._pool.transaction() as cur:
                row = cur.execute("SELECT has_image FROM jobs WHERE id=%s", (job_id,)).fetchone()
            if row and row[0]:
                raise FileNotFoundError("the job's input image was lost; resubmit it")
            return None
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.array(im.convert("RGB")))

    def cancel(self, job_id: str) -> bool:
        """Mark a queued or running job cancelled (its worker stops it at its next heartbeat)."""
        with self._pool.transaction() as cur:
            cur.execute("UPDATE jobs SET status='cancelled', completed_at=%s WHERE id=%s AND status = ANY(%s)",
                        (time.time(), job_id, list(_ACTIVE)))  # fmt: skip
            return cur.rowcount > 0

    def delete(self, job_id: str) -> bool:
        """Delete the row, then its objects (after the commit: a `complete` holding the row finishes first)."""
        with self._pool.transaction() as cur:
            gone = cur.execute("DELETE FROM jobs WHERE id=%s", (job_id,)).rowcount > 0
        self.objects.delete(video_key(job_id))
        self.objects.delete(input_key(job_id))
        return gone

    def content_response(self, job_id: str, range_header: str | None = None) -> Response | None:
        """The MP4 streamed from the object store (one byte range when asked: 206, or 416), or None without one."""
        size = self.objects.size(video_key(job_id))
        if size is None:
            return None
        headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{job_id}.mp4"'}
        try:
            span = byte_range(range_header, size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = span or (0, size - 1)
        stream = self.objects.open(video_key(job_id), start, end if span else None)
        if stream is None:  # deleted meanwhile
            return None
        headers["Content-Length"] = str(stream.end - stream.start + 1)
        if span:
            headers["Content-Range"] = f"bytes {stream.start}-{stream.end}/{stream.size}"
        return StreamingResponse(stream.chunks, status_code=206 if span else 200, media_type="video/mp4",
                                 headers=headers)  # fmt: skip

    def close(self) -> None:
        self._pool.close()

    # what workers use

    def claim(self, worker_id: str, limit: int) -> list[Job]:
        """Take up to `limit` of the oldest queued jobs for `worker_id` (now in_progress, heartbeat now)."""
        if limit < 1:
            return []
        with self._pool.transaction() as cur:
            # the CTE runs once and locks what it picks; rows another claim holds are skipped, not waited for
            cur.execute(
                "WITH picked AS (SELECT id FROM jobs WHERE status='queued' ORDER BY created_at, id LIMIT %s"
                " FOR UPDATE SKIP LOCKED) UPDATE jobs SET status='in_progress', progress=0, worker=%s,"
                f" heartbeat_at=now() FROM picked WHERE jobs.id = picked.id RETURNING {_qualified('jobs')}",
                (limit, worker_id),
            )
            jobs = [Job(*r) for r in cur.fetchall()]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def heartbeat(self, worker_id: str, job_ids: Iterable[str]) -> set[str]:
        """Renew the lease of `worker_id`'s running jobs; returns those that are no longer its own (cancelled,
        deleted, requeued by another worker after a missed lease, failed): the worker stops them."""
        ids = list(job_ids)
        if not ids:
            return set()
        with self._pool.transaction() as cur:
            cur.execute("UPDATE jobs SET heartbeat_at=now() WHERE id = ANY(%s) AND worker=%s AND status='in_progress'"
                        " RETURNING id", (ids, worker_id))  # fmt: skip
            ours = {r[0] for r in cur.fetchall()}
        return set(ids) - ours

    def progress(self, worker_id: str, job_id: str, progress: int) -> bool:
        """Record progress; False when the job is no longer `worker_id`'s to run."""
        with self._pool.transaction() as cur:
            cur.execute("UPDATE jobs SET progress=%s WHERE id=%s AND worker=%s AND status='in_progress'",
                        (progress, job_id, worker_id))  # fmt: skip
            return cur.rowcount > 0

    def _requeue(self, cur: psycopg.Cursor, where: str, params: dict, count_attempt: bool) -> list[str]:
        """Running jobs matching `where` back to the queue, or failed when they used up their attempts."""
        spent = "attempts + 1 >= %(max)s" if count_attempt else "FALSE"
        cur.execute(
            f"UPDATE jobs SET attempts = attempts + {int(count_attempt)}, progress = 0, worker = NULL,"
            f" heartbeat_at = NULL, status = CASE WHEN {spent} THEN 'failed' ELSE 'queued' END,"
            f" completed_at = CASE WHEN {spent} THEN %(now)s END, error = CASE WHEN {spent} THEN %(error)s END"
            f" WHERE status = 'in_progress' AND {where} RETURNING id, status",
            {"max": self.max_attempts, "now": time.time(), **params,
             "error": f"the job was interrupted {self.max_attempts} times (its worker stopped): not retried again"},
        )  # fmt: skip
        rows = cur.fetchall()
        if any(status == "queued" for _, status in rows):
            cur.execute(f"NOTIFY {CHANNEL}")
        return [job_id for job_id, _ in rows]

    def requeue_stale(self, lease_s: float | None = None) -> list[str]:
        """Jobs whose worker missed its lease (no heartbeat for `lease_s`): back to the queue with one more attempt
        counted, or failed after `max_attempts`. Any worker calls this: a dead worker's jobs run elsewhere."""
        lease = self.lease_s if lease_s is None else lease_s
        with self._pool.transaction() as cur:
            ids = self._requeue(cur, "heartbeat_at < now() - make_interval(secs => %(lease)s)", {"lease": lease}, True)
        if ids:
            log.warning("requeued %d job(s) whose worker stopped heartbeating: %s", len(ids), ", ".join(ids))
        return ids

    def release(self, worker_id: str, job_ids: Iterable[str] | None = None, *, count_attempt: bool = False) -> int:
        """Put `worker_id`'s running jobs (all, or `job_ids`) back in the queue: a graceful stop counts no attempt;
        `count_attempt` for a job its engine failed under (failed after `max_attempts`, like a crash)."""
        with self._pool.transaction() as cur:
            if job_ids is None:
                return len(self._requeue(cur, "worker = %(worker)s", {"worker": worker_id}, count_attempt))
            where, params = "worker = %(worker)s AND id = ANY(%(ids)s)", {"worker": worker_id, "ids": list(job_ids)}
            return len(self._requeue(cur, where, params, count_attempt))

    def complete(self, job_id: str, mp4: Path) -> bool:
        """Publish the finished MP4 (a local file; the caller deletes it) and mark the job completed, in one step as
        far as an object store allows (see the module docstring). False (nothing published) when the job was
        deleted, cancelled or failed meanwhile."""
        tmp = f"tmp/{job_id}.{secrets.token_hex(8)}.mp4"
        self.objects.put_file(tmp, Path(mp4))
        try:
            with self._pool.transaction() as cur:
                row = cur.execute("SELECT status FROM jobs WHERE id=%s FOR UPDATE", (job_id,)).fetchone()
                if row is None or row[0] in ("cancelled", "failed"):
                    return False
                if row[0] != "completed":  # (another worker may have finished it after a lease ran out)
                    self.objects.copy(tmp, video_key(job_id))  # under the row lock: a DELETE waits for it
                    cur.execute("UPDATE jobs SET status='completed', progress=100, completed_at=%s, error=NULL,"
                                " worker=NULL, heartbeat_at=NULL WHERE id=%s", (time.time(), job_id))  # fmt: skip
        finally:
            self.objects.delete(tmp)
        self.objects.delete(input_key(job_id))
        return True

    def fail(self, job_id: str, error: str) -> bool:
        """Mark a queued or running job failed with `error`; False if it was cancelled, deleted or finished."""
        with self._pool.transaction() as cur:
            cur.execute("UPDATE jobs SET status='failed', error=%s, completed_at=%s, worker=NULL, heartbeat_at=NULL"
                        " WHERE id=%s AND status = ANY(%s)", (error, time.time(), job_id, list(_ACTIVE)))  # fmt: skip
            return cur.rowcount > 0

    async def notifications(self, retry_s: float = 2.0) -> AsyncIterator[None]:
        """Yields whenever a job may be waiting: once on (re)connecting, then at each NOTIFY on the channel. Its own
        connection, reopened after an error; a consumer should still poll (a notification is only a hint)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    yield
                    async for _ in conn.notifies():
                        yield
            except psycopg.OperationalError as exc:
                log.warning("job notifications lost (%s); listening again in %.0f s", exc, retry_s)
                await asyncio.sleep(retry_s)


class ClusterJobs:
    """What the REST routes use of `app.state.job_runner`, on an ingress whose jobs run on the replicas' workers:
    the queue bound, and cancel by changing the row (the worker holding the job sees it at its next heartbeat)."""

    def __init__(self, store: PgJobStore, max_queued: int) -> None:
        self.store, self.max_queued = store, max_queued

    @property
    def num_queued(self) -> int:
        """Jobs queued or running, over the whole cluster."""
        return self.store.count_active()

    def check_room(self) -> None:
        n = self.store.count_active()
        if n >= self.max_queued:
            raise JobQueueFull(f"{n} jobs are queued or running, the limit is {self.max_queued}")

    def submit(self, job: Job, image: torch.Tensor | None) -> None:
        """Nothing to do: `store.create` wrote the row and its NOTIFY woke the workers."""

    def resume(self) -> int:
        return 0  # jobs left by a stopped node are requeued by the workers' leases

    def cancel(self, job_id: str) -> bool:
        return self.store.cancel(job_id)

    async def shutdown(self) -> None:
        """Nothing runs here: jobs stay in the store for the workers."""
