"""A text-conditioned model on the Ray Serve application (local Ray cluster, two logical GPUs, the tiny-text model
with its tiny random T5 on each replica): the ingress encodes prompts through a replica, a guided stream's prompt
changes mid-stream through the ingress, a REST job with a prompt runs on a replica's job worker, and the app says
the model takes text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("ray", reason="ray[serve] is in the test extra")

from ca2vdm.client.stream import Clip, StreamClient  # noqa: E402
from tests.cluster.conftest import new_database  # noqa: E402
from tests.cluster.test_serve import Cluster, _frames, _post_job, _wait_job, local_cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_cluster(tmp_path_factory, postgres_url, s3_url) -> Iterator[Cluster]:
    """Two replicas of random:tiny-text (max_sessions=2: one guided session each); a stream runs at most one clip
    ahead of its client (max_pending_clips=1), so a prompt change sent on clip 1 lands mid-stream."""
    tmp = tmp_path_factory.mktemp("text_cluster")
    args = {"replicas": 2, "cpus_per_replica": 0.5, "torch_threads": 1, "model": "random:tiny-text", "device": "cpu",
            "data_dir": str(tmp / "data"), "session_dir": str(tmp / "sessions"), "max_sessions": 2,
            "max_pending_clips": 1, "min_prompt_interval_s": 0.1, "job_store_url": new_database(postgres_url),
            "object_store_url": s3_url}  # fmt: skip
    with local_cluster(args, s3_url, ready_s=90) as c:
        yield c


async def _stream(cluster: Cluster, switch_to: str | None) -> list[bytes]:
    """A guided stream's JPEG frames (33: the condition frame and 4 clips), its prompt changed after clip 1."""
    client = StreamClient(cluster.url)
    frames: list[bytes] = []
    async for event in client.stream(format="jpeg", pace="max", seed=4, steps=2, num_frames=33,
                                     prompt="a red circle", guidance_scale=3.0):  # fmt: skip
        if isinstance(event, Clip):
            frames += event.media
            if event.index == 1 and switch_to is not None:
                await client.set_prompt(switch_to, recache=True)
    return frames


def test_a_guided_stream_changes_its_prompt_through_the_ingress(text_cluster):
    info = text_cluster.get("/v1/models").json()
    assert info["text"] is True and info["guidance_scale"] >= 1
    plain = asyncio.run(_stream(text_cluster, None))
    switched = asyncio.run(_stream(text_cluster, "a blue square"))
    assert len(plain) == len(switched) == 33
    assert plain[:9] == switched[:9]  # the first frame and clip 1 come before the change (same seed, same model)
    assert plain[-8:] != switched[-8:]  # the last clip is under the new prompt
    assert text_cluster.metric('ca2vdm_prompt_switches_total{mode="recache"') == 1


def test_a_job_with_a_prompt_runs_on_a_replica(text_cluster):
    job_id = _post_job(text_cluster, num_frames=17, seed=2, prompt="a green triangle", guidance_scale=2.0)
    job = _wait_job(text_cluster, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job
    assert job["prompt"] == "a green triangle" and job["guidance_scale"] == 2.0
    assert _frames(text_cluster.get(f"/v1/videos/{job_id}/content").content) == 17
