"""Job workers on real engines (the tiny model on the CPU) sharing one store: jobs go to whichever has room, a
crashed worker's job is finished by another after its lease, a graceful stop hands jobs back, cancel and delete
reach the worker running the job, an engine error fails the job."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from ca2vdm.server.cluster.job_worker import JobWorker
from ca2vdm.server.cluster.objects import LocalObjects, S3Objects
from ca2vdm.server.cluster.pg_jobs import ClusterJobs, PgJobStore, video_key
from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.media import read_video
from tests.cluster.conftest import new_database
from tests.images import smooth_image

LONG = 150  # frames: a job still running a second after it starts (about 20 ms a frame here)


@pytest.fixture(scope="module")
def engines(tiny_pipe):
    """Two replicas' engines (one model: the tiny pipeline is read-only in the forward)."""
    started = [Engine(tiny_pipe, EngineConfig(max_sessions=4, max_batch=4)).start(warmup=False) for _ in range(2)]
    yield started
    for engine in started:
        engine.stop()


@pytest.fixture
def db(postgres_url) -> str:
    return new_database(postgres_url)


def attempts(db: str, job_id: str) -> int:
    with psycopg.connect(db) as conn:
        return conn.execute("SELECT attempts FROM jobs WHERE id=%s", (job_id,)).fetchone()[0]


async def until(check, timeout: float = 20.0, every: float = 0.05):
    """Wait for `check()` (run on a thread: it may query the database) to return something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        await asyncio.sleep(every)


def decoded_frames(objects, job_id: str, tmp_path) -> int:
    path = tmp_path / f"{job_id}.mp4"
    path.write_bytes(objects.get_bytes(video_key(job_id)))
    video = read_video(path)
    assert video.shape[1:] == (16, 16, 3)
    return video.shape[0]


def test_two_workers_share_the_queue(db, engines, tmp_path, s3_url):
    """Idle workers wake on the submit's NOTIFY (no poll within the test's time), both run jobs, the videos are
    whole, with the requested frame counts."""
    objects = S3Objects(f"{s3_url}-share", create_bucket=True)
    stores = [PgJobStore(db, objects) for _ in engines]  # one per node, as on a cluster
    claimed: dict[str, list[str]] = {"a": [], "b": []}
    for name, store in zip(claimed, stores, strict=True):
        claim = store.claim
        store.claim = lambda worker, limit, claim=claim, name=name: [  # type: ignore[method-assign]
            claimed[name].append(j.id) or j for j in claim(worker, limit)]  # fmt: skip
    workers = [JobWorker(store, engine, f"replica-{name}", max_running=2, heartbeat_s=30, lease_s=60, poll_s=30)
               for name, store, engine in zip(claimed, stores, engines, strict=True)]  # fmt: skip

    async def main() -> list[str]:
        for worker in workers:
            await worker.start()
        await asyncio.sleep(0.3)  # both idle, waiting for a notification (the next poll is 30 s away)
        t0 = time.monotonic()
        first = stores[0].create(9, 1, "ddim", 2, smooth_image(16, 16, 1))
        await until(lambda: stores[0].get(first.id).status != "queued", timeout=3)
        assert time.monotonic() - t0 < 3
        ids = [first.id] + [stores[1].create(n, n, "ddim", 2, None).id for n in (20, 30, 25, 17, 9)]
        await until(lambda: all(stores[0].get(i).status == "completed" for i in ids))
        for worker in workers:
            await worker.stop()
        return ids

    ids = asyncio.run(main())
    assert sorted(claimed["a"] + claimed["b"]) == sorted(ids) and claimed["a"] and claimed["b"]
    for job_id in ids:
        job = stores[0].get(job_id)
        assert job.progress == 100 and decoded_frames(objects, job_id, tmp_path) == job.num_frames
    for store in stores:
        store.close()


def test_a_crashed_workers_job_is_finished_by_another(db, engines, tmp_path):
    objects = LocalObjects(tmp_path / "shared")
    a, b = PgJobStore(db, objects), PgJobStore(db, objects)

    async def main() -> str:
        first = JobWorker(a, engines[0], "replica-a", max_running=1, heartbeat_s=0.2, lease_s=1.0)
        await first.start()
        job = a.create(LONG, 7, "ddim", 2, smooth_image(16, 16, 2))
        await until(lambda: (a.get(job.id).progress or 0) > 0)
        await first.stop(release=False)  # a crash: no goodbye, its heartbeats just stop
        assert a.get(job.id).status == "in_progress"
        second = JobWorker(b, engines[1], "replica-b", max_running=1, heartbeat_s=0.2, lease_s=1.0)
        await second.start()
        await until(lambda: b.get(job.id).status == "completed", timeout=30)
        await second.stop()
        return job.id

    job_id = asyncio.run(main())
    assert attempts(db, job_id) == 1  # the crash counted
    assert decoded_frames(objects, job_id, tmp_path) == LONG
    a.close()
    b.close()


def test_a_graceful_stop_hands_the_job_back(db, engines, tmp_path):
    objects = LocalObjects(tmp_path / "shared")
    store = PgJobStore(db, objects)

    async def main() -> str:
        first = JobWorker(store, engines[0], "replica-a", max_running=1, heartbeat_s=0.2, lease_s=1.0)
        await first.start()
        job = store.create(LONG, 3, "ddim", 2, None)
        await until(lambda: (store.get(job.id).progress or 0) > 0)
        await first.stop(drain_s=0.1)  # too short to finish: the job goes back, no attempt counted
        assert store.get(job.id).status == "queued" and store.get(job.id).progress == 0
        assert engines[0].num_active == 0 or await until(lambda: engines[0].num_active == 0, timeout=5)
        second = JobWorker(store, engines[1], "replica-b", max_running=1, heartbeat_s=0.2, lease_s=1.0)
        await second.start()
        await until(lambda: store.get(job.id).status == "completed", timeout=30)
        await second.stop()
        return job.id

    job_id = asyncio.run(main())
    assert attempts(db, job_id) == 0 and decoded_frames(objects, job_id, tmp_path) == LONG
    store.close()


def test_cancel_and_delete_reach_the_running_worker(db, engines, tmp_path):
    objects = LocalObjects(tmp_path / "shared")
    store = PgJobStore(db, objects)
    ingress = ClusterJobs(store, max_queued=10)

    async def main() -> None:
        worker = JobWorker(store, engines[0], "replica-a", max_running=2, heartbeat_s=0.2, lease_s=1.0)
        await worker.start()
        cancelled, deleted = store.create(5000, 1, "ddim", 2, None), store.create(5000, 2, "ddim", 2, None)
        await until(lambda: all((store.get(j.id).progress or 0) > 0 for j in (cancelled, deleted)))
        assert worker.running == {cancelled.id, deleted.id}
        assert ingress.cancel(cancelled.id)
        store.delete(deleted.id)
        await until(lambda: not worker.running, timeout=5)  # both stopped on this worker
        await asyncio.sleep(0.5)
        await worker.stop()
        assert store.get(cancelled.id).status == "cancelled" and store.get(deleted.id) is None

    asyncio.run(main())
    assert not [p for p in objects.root.rglob("*") if p.is_file()]  # no video, no leftover


def test_an_engine_error_fails_the_job(db, engines, tmp_path):
    store = PgJobStore(db, LocalObjects(tmp_path / "shared"))

    async def main() -> None:
        worker = JobWorker(store, engines[0], "replica-a", max_running=1, heartbeat_s=0.2, lease_s=1.0)
        await worker.start()
        job = store.create(5, 1, "ddim", 2, smooth_image(8, 8))  # not the model's frame size
        failed = await until(lambda: (j := store.get(job.id)).status == "failed" and j)
        assert "image must be" in failed.error and failed.completed_at
        ok = store.create(5, 1, "ddim", 2, None)  # the worker goes on
        await until(lambda: store.get(ok.id).status == "completed")
        await worker.stop()

    asyncio.run(main())
    store.close()
