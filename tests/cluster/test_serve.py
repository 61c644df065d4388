"""The Ray Serve application on a local Ray cluster with two logical GPUs: two engine replicas of the tiny model
behind the ingress, reached as a client reaches it (Serve's HTTP proxy on loopback, real websocket and HTTP
clients). Sessions spread over replicas, a full replica is skipped, a resume goes back to its replica, a replica
that is killed or leaves does not disturb the other's sessions, and the app reads as the single server does."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av
import httpx
import psycopg
import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is in the test extra")
from ray import serve  # noqa: E402

from ca2vdm.client.stream import Clip, Ready, StreamClient, StreamError  # noqa: E402
from ca2vdm.server.cluster.app import build  # noqa: E402
from ca2vdm.server.cluster.objects import objects_from_url  # noqa: E402
from ca2vdm.server.cluster.router import replica_of  # noqa: E402
from tests.cluster.conftest import new_database  # noqa: E402
from tests.e2e.test_resume import START, session, with_drops  # noqa: E402

pytestmark = pytest.mark.slow

APP = "ca2vdm"


@dataclass
class Cluster:
    url: str
    args: dict

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def replicas(self) -> list[str]:
        """Engine replica ids as Ray names their actors."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return sorted(n.rsplit("#", 1)[-1] for n in names if "EngineReplica" in n)

    def metric(self, name: str, replica: str | None = None) -> float:
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if (
                line.startswith(name + "{")
                or line.startswith(name + " ")
                or (name.endswith('"') and line.startswith(name))
            ):
                if replica is None or f'replica="{replica}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(args: dict) -> None:
    serve.run(build(args), name=APP, route_prefix="/")


@contextmanager
def local_cluster(args: dict, s3_url: str, ready_s: float = 60) -> Iterator[Cluster]:
    """A local Ray cluster with two logical GPUs running the app built from `args` (S3 objects at `s3_url`, reachable
    from the replicas too), once every replica is ready; shut down after."""
    objects_from_url(s3_url, create_bucket=True)
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the S3 endpoint, for the replicas too
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": aws})  # fmt: skip
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(args)
        c = Cluster(f"http://127.0.0.1:{port}", args)
        deadline = time.monotonic() + ready_s
        while c.get("/readyz").status_code != 200 or c.metric("ca2vdm_cluster_replicas") < args["replicas"]:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.5)
        yield c
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_url, s3_url) -> Iterator[Cluster]:
    """Two engine replicas (max_sessions=2, max_waiting=0 each), jobs in PostgreSQL with MP4s in S3 (moto)."""
    tmp = tmp_path_factory.mktemp("cluster")
    args = {"replicas": 2, "cpus_per_replica": 0.5, "torch_threads": 1, "model": "random:tiny", "device": "cpu",
            "data_dir": str(tmp / "data"), "session_dir": str(tmp / "sessions"), "max_sessions": 2,
            "max_waiting": 0, "graceful_shutdown_timeout_s": 30, "job_store_url": new_database(postgres_url),
            "object_store_url": s3_url, "job_lease_s": 2.0}  # fmt: skip
    with local_cluster(args, s3_url) as c:
        yield c


async def _open(client: StreamClient, **kwargs) -> tuple[object, Ready]:
    events = client.stream(format="jpeg", **kwargs)
    ready = await events.__anext__()
    assert isinstance(ready, Ready)
    return events, ready


async def _one_on_each(client: StreamClient, **kwargs) -> dict:
    """Streams until each replica holds one (new sessions go where most capacity is spare, so two may share one):
    replica id -> its events."""
    opened: dict = {}
    for seed in range(10, 30):
        events, ready = await _open(client, seed=seed, steps=2, **kwargs)
        if replica_of(ready.session_id) in opened:
            await events.aclose()
            continue
        opened[replica_of(ready.session_id)] = events
        if len(opened) == 2:
            return opened
    raise AssertionError("the sessions did not spread over the replicas")


async def _drain(events) -> tuple[int, list[Clip]]:
    clips = [e async for e in events if isinstance(e, Clip)]
    return sum(c.num_frames for c in clips), clips


def test_the_app_reads_as_the_single_server(cluster):
    assert cluster.get("/healthz").json() == {"status": "ok"}
    info = cluster.get("/v1/models").json()
    assert (info["width"], info["height"], info["fps"]) == (16, 16, 8)
    assert isinstance(info["realtime_capacity_sessions"], int)  # the replicas' measured capacities, summed
    assert "/v1/stream/messages" in cluster.get("/openapi.json").json()["paths"]
    text = cluster.get("/metrics").text
    replicas = cluster.replicas()
    assert len(replicas) == 2
    for replica in replicas:  # every replica's metrics, labelled, and the totals
        assert f'ca2vdm_cache_pages_total{{replica="{replica}"}}' in text
        assert f'ca2vdm_realtime_capacity_sessions{{replica="{replica}"}}' in text
    assert cluster.metric("ca2vdm_cluster_cache_pages_total") == cluster.metric("ca2vdm_cache_pages_total")
    assert cluster.metric("ca2vdm_cluster_replicas_scraped") == 2


def test_sessions_spread_and_a_full_replica_is_skipped(cluster):
    """max_sessions=2 and max_waiting=0 per replica: four live sessions (2 steps: within real-time capacity) fit, two
    on each, the fifth is refused with server_busy only because both replicas are full."""

    async def main() -> None:
        client = StreamClient(cluster.url)
        opened = [await _open(client, num_frames=None, seed=i, steps=2) for i in range(4)]
        homes = [replica_of(ready.session_id) for _, ready in opened]
        assert sorted(set(homes)) == cluster.replicas() and homes.count(homes[0]) == 2, homes
        with pytest.raises(StreamError) as refused:
            await _open(client, num_frames=8, steps=2)
        assert refused.value.code == "server_busy"
        for events, _ in opened:
            await events.aclose()

    asyncio.run(main())


def test_a_resume_returns_to_its_replica(cluster):
    """A client whose connection dies mid-clip three times gets, byte for byte, the video an uninterrupted client of
    the same replica gets: each resume went back to the replica holding the session's pages (exact resumes, counted
    there). (Replicas are separate processes: their float rounding may differ, so the reference is one whose session
    ran on the same replica.)"""
    address = cluster.url.removeprefix("http://")
    before = {r: cluster.metric('ca2vdm_resumes_total{kind="exact"', r) for r in cluster.replicas()}
    frames, latencies = asyncio.run(with_drops(address, {2, 5, 8}))
    gained = {r: cluster.metric('ca2vdm_resumes_total{kind="exact"', r) - n for r, n in before.items()}
    home = max(gained, key=gained.get)
    assert gained[home] == 3 and sum(gained.values()) == 3, gained
    for _ in range(8):  # new sessions go to either replica (most spare capacity, ties at random)
        reference: list[bytes] = []
        ready = asyncio.run(session(address, START, reference))["ready"]
        if replica_of(ready["session_id"]) == home:
            break
    assert replica_of(ready["session_id"]) == home
    assert frames == reference
    assert len(latencies) == 3 and max(latencies) < 10.0


def _wait_job(cluster: Cluster, job_id: str, status: set[str], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := cluster.get(f"/v1/videos/{job_id}").json())["status"] not in status:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def _frames(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(video=0))


def _post_job(cluster: Cluster, **body) -> str:
    answer = httpx.post(cluster.url + "/v1/videos", json={"steps": 2, **body}, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_jobs_run_on_the_replicas_and_their_videos_come_from_the_store(cluster):
    ids = [_post_job(cluster, num_frames=17, seed=i) for i in range(3)]
    for job_id in ids:
        assert _wait_job(cluster, job_id, {"completed", "failed"})["status"] == "completed"
        content = cluster.get(f"/v1/videos/{job_id}/content")
        assert content.headers["content-type"] == "video/mp4" and _frames(content.content) == 17
    assert cluster.metric('ca2vdm_jobs{status="completed"') >= 3
    listed = [j["id"] for j in cluster.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert set(ids) <= set(listed)


def _kill(replica: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(replica):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica}")


def _job_worker(cluster: Cluster, job_id: str) -> str:
    with psycopg.connect(cluster.args["job_store_url"]) as db:
        return db.execute("SELECT worker FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]


def test_a_killed_replica_leaves_the_other_untouched(cluster):
    """Kill the replica running a job while each replica streams: the other replica's stream goes on to its end;
    the killed one's client resumes, reaches the survivor, which has nothing of it (no drain saved it) and answers
    `expired`; the job is requeued when its lease runs out and finished by the survivor; Serve brings a new replica
    up."""
    job = _post_job(cluster, num_frames=241, seed=9)
    _wait_job(cluster, job, {"in_progress"})
    victim = _job_worker(cluster, job)

    async def main() -> None:
        opened = await _one_on_each(StreamClient(cluster.url), num_frames=48)
        doomed, other = opened.pop(victim), next(iter(opened.values()))
        await doomed.__anext__()
        _kill(victim)
        with pytest.raises(StreamError) as lost:
            await _drain(doomed)
        assert lost.value.code == "expired"
        frames, clips = await _drain(other)
        assert frames == 48 and all(c.first_frame == 8 * i for i, c in enumerate(clips))

    asyncio.run(main())
    done = _wait_job(cluster, job, {"completed", "failed"})
    assert done["status"] == "completed", done
    assert _frames(cluster.get(f"/v1/videos/{job}/content").content) == 241
    assert _job_worker(cluster, job) != victim
    deadline = time.monotonic() + 60  # Serve replaces the dead replica
    while len(cluster.replicas()) < 2 or cluster.metric("ca2vdm_cluster_replicas") < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)


def test_a_leaving_replica_hands_its_sessions_over(cluster):
    """Scale-down from two replicas to one while each streams: the leaving replica's session is saved, its client
    resumes on the other replica (cache rebuilt), and both videos arrive whole."""

    async def main() -> None:
        opened = list((await _one_on_each(StreamClient(cluster.url), num_frames=64)).values())
        for events in opened:
            await events.__anext__()
        await asyncio.to_thread(deploy, {**cluster.args, "replicas": 1})
        results = await asyncio.gather(*(_drain(events) for events in opened))
        for frames, clips in results:
            assert frames == 64 - 8 and clips[0].first_frame == 8
            assert all(b.first_frame == a.first_frame + a.num_frames for a, b in zip(clips, clips[1:], strict=False))

    asyncio.run(main())
    assert cluster.metric("ca2vdm_resumes_total") >= 1
    deploy(cluster.args)  # back to two replicas for whatever runs next
