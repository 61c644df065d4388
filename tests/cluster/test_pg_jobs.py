"""The shared job store on a real PostgreSQL: claims, leases, release, cancel and delete, publishing, list cursors
(the same as the SQLite store's), wake-ups, and the REST routes serving it."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
import torch
from fastapi import FastAPI
from starlette.testclient import TestClient

from ca2vdm.server.api import videos
from ca2vdm.server.api.clients import ClientGuard
from ca2vdm.server.api.jobs import JobStore
from ca2vdm.server.api.requests import RequestDecoder
from ca2vdm.server.api.settings import Settings
from ca2vdm.server.cluster.objects import LocalObjects, S3Objects
from ca2vdm.server.cluster.pg_jobs import ClusterJobs, PgJobStore, byte_range, input_key, video_key
from tests.api.test_stream import png_b64
from tests.cluster.conftest import new_database
from tests.images import smooth_image


@pytest.fixture
def db(postgres_url) -> str:
    return new_database(postgres_url)


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    if request.param == "local":
        return LocalObjects(tmp_path / "objects")
    return S3Objects(f"{request.getfixturevalue('s3_url')}-{secrets.token_hex(4)}", create_bucket=True)


@pytest.fixture
def store(db, tmp_path):
    store = PgJobStore(db, LocalObjects(tmp_path / "objects"), max_attempts=2)
    yield store
    store.close()


ROW = ("status", "attempts", "worker", "heartbeat_at", "progress", "error")


def row(db: str, job_id: str) -> dict | None:
    """The job's row, with the columns only workers see."""
    with psycopg.connect(db) as conn:
        found = conn.execute(f"SELECT {', '.join(ROW)} FROM jobs WHERE id=%s", (job_id,)).fetchone()
    return dict(zip(ROW, found, strict=True)) if found else None


def requeued(attempts: int) -> dict:
    """A row back in the queue (its heartbeat left out)."""
    return {"status": "queued", "attempts": attempts, "worker": None, "progress": 0, "error": None}


def without_heartbeat(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "heartbeat_at"}


def age(db: str, job_id: str, seconds: float) -> None:
    """As if the job's worker had not heartbeated for `seconds`."""
    with psycopg.connect(db) as conn:
        conn.execute("UPDATE jobs SET heartbeat_at = now() - make_interval(secs => %s) WHERE id=%s", (seconds, job_id))


def keys(objects) -> set[str]:
    if isinstance(objects, LocalObjects):
        return {str(p.relative_to(objects.root)) for p in objects.root.rglob("*") if p.is_file()}
    listed = objects._client.list_objects_v2(Bucket=objects.bucket, Prefix=f"{objects.prefix}/")
    return {o["Key"][len(objects.prefix) + 1 :] for o in listed.get("Contents", [])}


def new(store, num_frames: int = 5, image: torch.Tensor | None = None):
    return store.create(num_frames, 1, "ddim", 2, image)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_list_cursor_semantics_match_the_sqlite_store(kind, request, tmp_path):
    if kind == "sqlite":
        store = JobStore(tmp_path)
    else:
        store = PgJobStore(new_database(request.getfixturevalue("postgres_url")), LocalObjects(tmp_path))
    try:
        ids = [new(store).id for _ in range(5)]
        newest_first = ids[::-1]
        page, more = store.list(2, None)
        assert [j.id for j in page] == newest_first[:2] and more
        page2, more = store.list(2, page[-1].id)
        assert [j.id for j in page2] == newest_first[2:4] and more
        store.delete(page[-1].id)  # a cursor stays valid after its job is deleted
        again, _ = store.list(2, page[-1].id)
        assert [j.id for j in again] == newest_first[2:4]
        last, more = store.list(2, page2[-1].id)
        assert [j.id for j in last] == newest_first[4:] and not more
        everything, more = store.list(100, None)
        assert len(everything) == 4 and not more
        assert store.list(100, "video_" + "f" * 30)[0] == everything  # a cursor from the future: everything
        with pytest.raises(ValueError):
            store.list(2, "video_nothex" + "0" * 24)
        assert store.count_by_status()["queued"] == 4 and [j.id for j in store.queued()] == [
            i for i in ids if i != page[-1].id]  # fmt: skip
    finally:
        store.close()


def test_create_get_update_and_the_image(store, db):
    image = smooth_image(16, 16, 3)
    job = new(store, image=image)
    assert store.get(job.id) == job and row(db, job.id)["attempts"] == 0
    assert torch.equal(store.image(job.id), image)  # PNG: lossless
    assert store.image(new(store).id) is None
    store.update(job.id, progress=40)
    assert store.get(job.id).progress == 40
    with pytest.raises(ValueError):
        store.update(job.id, worker="me")  # only the job's own fields
    store.objects.delete(input_key(job.id))
    with pytest.raises(FileNotFoundError, match="lost"):
        store.image(job.id)
    assert store.get("video_" + "0" * 30) is None


def test_two_workers_claiming_at_once_never_take_the_same_job(db, tmp_path):
    objects = LocalObjects(tmp_path)
    stores = [PgJobStore(db, objects) for _ in range(2)]  # two nodes
    ids = [new(stores[0]).id for _ in range(60)]
    claimed: dict[str, list[str]] = defaultdict(list)
    start = threading.Barrier(8)

    def work(i: int) -> None:
        store, worker = stores[i % 2], f"w{i}"
        start.wait()
        while jobs := store.claim(worker, 3):
            claimed[worker] += [j.id for j in jobs]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everyone = [job_id for got in claimed.values() for job_id in got]
    assert sorted(everyone) == sorted(ids), "a job claimed twice, or never"
    assert len(claimed) > 1
    for worker, got in claimed.items():
        for job_id in got:
            r = row(db, job_id)
            assert r["status"] == "in_progress" and r["worker"] == worker and r["heartbeat_at"] is not None
    for store in stores:
        store.close()


def test_claims_take_the_oldest_first(store):
    ids = [new(store).id for _ in range(4)]
    assert [j.id for j in store.claim("w", 3)] == ids[:3]
    assert all(j.status == "in_progress" for j in store.claim("w", 3)) and store.claim("w", 3) == []
    assert store.claim("w", 0) == []


def test_a_dead_workers_job_is_requeued_counting_attempts_then_failed(store, db):
    job = new(store)
    store.claim("w1", 1)
    assert store.requeue_stale(60) == []  # its heartbeat is fresh
    age(db, job.id, 120)
    assert store.heartbeat("w1", [job.id]) == set()  # a heartbeat renews the lease ...
    assert store.requeue_stale(60) == []
    age(db, job.id, 120)  # ... a missed one loses it
    assert store.requeue_stale(60) == [job.id]
    assert without_heartbeat(row(db, job.id)) == requeued(attempts=1)
    assert store.heartbeat("w1", [job.id]) == {job.id}  # were w1 alive after all, it learns that it lost the job
    assert [j.id for j in store.claim("w2", 1)] == [job.id]
    time.sleep(0.3)  # a real lease running out (store default)
    store.lease_s = 0.2
    assert store.requeue_stale() == [job.id]
    failed = store.get(job.id)  # max_attempts=2: interrupted twice
    assert failed.status == "failed" and "interrupted 2 times" in failed.error and failed.completed_at
    assert row(db, job.id)["attempts"] == 2 and store.claim("w3", 1) == []


def test_release_requeues_without_an_attempt(store, db):
    a, b, c = new(store), new(store), new(store)
    store.claim("w1", 2)
    store.claim("w2", 1)
    store.progress("w1", a.id, 50)
    assert store.release("w1") == 2
    for job in (a, b):
        assert without_heartbeat(row(db, job.id)) == requeued(attempts=0)
    assert row(db, c.id)["status"] == "in_progress"
    assert store.release("w2", [c.id], count_attempt=True) == 1 and row(db, c.id)["attempts"] == 1
    assert store.release("nobody") == 0


def test_heartbeat_and_progress_report_jobs_no_longer_ours(store, db):
    a, b, c, d = (new(store) for _ in range(4))
    store.claim("w1", 4)
    jobs = ClusterJobs(store, max_queued=10)
    assert jobs.cancel(a.id) and not jobs.cancel(a.id)
    store.delete(b.id)
    age(db, c.id, 100)
    store.requeue_stale(60)
    store.claim("w2", 1)  # c, now w2's
    assert store.heartbeat("w1", [a.id, b.id, c.id, d.id]) == {a.id, b.id, c.id}
    assert store.heartbeat("w2", [c.id]) == set() and store.heartbeat("w1", []) == set()
    assert not store.progress("w1", a.id, 10) and store.progress("w1", d.id, 10) and store.get(d.id).progress == 10
    assert store.get(a.id).status == "cancelled" and not store.fail(a.id, "late")
    assert store.fail(d.id, "boom") and store.get(d.id).error == "boom" and row(db, d.id)["worker"] is None


def fake_mp4(tmp_path: Path, data: bytes = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8) -> Path:
    path = tmp_path / "local.mp4"
    path.write_bytes(data)
    return path


def test_complete_publishes_and_delete_leaves_nothing(db, objects, tmp_path):
    store = PgJobStore(db, objects)
    job = new(store, image=smooth_image(16, 16))
    assert keys(objects) == {input_key(job.id)}
    store.claim("w", 1)
    mp4 = fake_mp4(tmp_path)
    assert store.complete(job.id, mp4)
    done = store.get(job.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert keys(objects) == {video_key(job.id)} and objects.get_bytes(video_key(job.id)) == mp4.read_bytes()
    assert row(db, job.id)["worker"] is None
    assert store.delete(job.id) and keys(objects) == set() and not store.delete(job.id)

    gone = new(store, image=smooth_image(16, 16))  # deleted while it ran: its video never appears
    store.claim("w", 1)
    store.delete(gone.id)
    assert not store.complete(gone.id, mp4) and keys(objects) == set()
    cancelled = new(store)
    store.claim("w", 1)
    store.cancel(cancelled.id)
    assert not store.complete(cancelled.id, mp4) and keys(objects) == set()
    assert store.get(cancelled.id).status == "cancelled"
    store.close()


class SlowCopy(LocalObjects):
    """A store whose copy to the final key takes a while (the window a DELETE could fall in)."""

    def copy(self, src: str, dst: str) -> None:
        time.sleep(0.3)
        super().copy(src, dst)


def test_a_delete_during_publishing_leaves_no_video(db, tmp_path):
    objects = SlowCopy(tmp_path / "objects")
    store = PgJobStore(db, objects)
    job = new(store)
    store.claim("w", 1)
    publishing = threading.Thread(target=store.complete, args=(job.id, fake_mp4(tmp_path)))
    publishing.start()
    time.sleep(0.15)  # complete holds the row and is copying
    assert store.delete(job.id)  # waits for the row, then removes what complete published
    publishing.join()
    assert store.get(job.id) is None and keys(objects) == set()
    store.close()


def test_create_and_requeues_wake_listeners(store, db):
    async def main() -> list[float]:
        waits = []
        listener = store.notifications().__aiter__()
        await asyncio.wait_for(listener.__anext__(), 5)  # listening
        for action in (lambda: new(store), lambda: store.claim("w", 1) and store.release("w")):
            t0 = time.monotonic()
            await asyncio.to_thread(action)
            await asyncio.wait_for(listener.__anext__(), 2)
            waits.append(time.monotonic() - t0)
        await listener.aclose()
        return waits

    assert all(w < 1.0 for w in asyncio.run(main()))


def test_byte_ranges():
    assert byte_range(None, 100) is None and byte_range("bytes=0-9", 0) is None
    assert byte_range("bytes=0-9", 100) == (0, 9) and byte_range("bytes=90-", 100) == (90, 99)
    assert byte_range("bytes=-10", 100) == (90, 99) and byte_range("bytes=-1000", 100) == (0, 99)
    assert byte_range("bytes=50-5000", 100) == (50, 99)
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-1", "bytes=-", "bytes=a-b"):
        assert byte_range(ignored, 100) is None, ignored
    for unsatisfiable in ("bytes=100-", "bytes=-0"):
        with pytest.raises(ValueError):
            byte_range(unsatisfiable, 100)


def test_rest_routes_on_the_shared_store(db, objects, tmp_path, tiny_pipe):
    """The REST routes with a PgJobStore and ClusterJobs as an ingress has them: submit, 429, content from the
    object store (ranges too), delete."""
    store = PgJobStore(db, objects)
    app = FastAPI()
    app.include_router(videos.router)
    settings = Settings(max_queued_jobs=2)
    app.state.jobs, app.state.job_runner = store, ClusterJobs(store, settings.max_queued_jobs)
    app.state.decoder = RequestDecoder(settings, tiny_pipe)
    app.state.clients = ClientGuard(0, 0, 60, 0)
    try:
        with TestClient(app) as client:
            r = client.post("/v1/videos", json={"image": png_b64(16, 16), "num_frames": 9, "seed": 4, "steps": 2})
            assert r.status_code == 202 and r.json()["status"] == "queued"
            job_id = r.json()["id"]
            assert objects.exists(input_key(job_id))
            assert client.post("/v1/videos", json={"num_frames": 9}).status_code == 202
            full = client.post("/v1/videos", json={"num_frames": 9})
            assert full.status_code == 429 and full.headers["retry-after"]
            assert app.state.job_runner.num_queued == 2
            assert client.get(f"/v1/videos/{job_id}/content").status_code == 409

            store.claim("w", 1)
            data = fake_mp4(tmp_path).read_bytes()
            store.complete(job_id, fake_mp4(tmp_path))
            content = client.get(f"/v1/videos/{job_id}/content")
            assert content.status_code == 200 and content.content == data
            assert content.headers["content-type"] == "video/mp4"
            assert content.headers["content-length"] == str(len(data))
            assert f'filename="{job_id}.mp4"' in content.headers["content-disposition"]
            part = client.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=10-19"})
            assert part.status_code == 206 and part.content == data[10:20]
            assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
            tail = client.get(f"/v1/videos/{job_id}/content", headers={"Range": "bytes=-7"})
            assert tail.status_code == 206 and tail.content == data[-7:]
            past = client.get(f"/v1/videos/{job_id}/content", headers={"Range": f"bytes={len(data)}-"})
            assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"

            listed = client.get("/v1/videos?limit=1").json()
            assert listed["has_more"] and len(listed["data"]) == 1
            assert client.delete(f"/v1/videos/{job_id}").json()["deleted"] is True
            assert client.get(f"/v1/videos/{job_id}/content").status_code == 404
            assert not any(k.endswith(f"{job_id}.mp4") or k.endswith(f"{job_id}.png") for k in keys(objects))
            assert app.state.job_runner.resume() == 0
    finally:
        app.state.decoder.close()
        store.close()
