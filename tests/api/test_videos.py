"""REST video jobs against a real server: lifecycle, persistence across restarts, crash recovery, errors."""

from __future__ import annotations

import sqlite3
import time

import httpx

from ca2vdm.server.media import read_video
from tests.api.conftest import running_server
from tests.api.test_stream import png_b64


def wait_for(address, job_id, status="completed", timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"http://{address}/v1/videos/{job_id}").json()
        if job["status"] == status:
            return job
        assert job["status"] not in ("failed", "cancelled") or job["status"] == status, job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_job_lifecycle(server, tmp_path):
    r = httpx.post(f"http://{server}/v1/videos", json={"image": png_b64(), "num_frames": 11, "seed": 5, "steps": 2})
    assert r.status_code == 202
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["num_frames"] == 11
    done = wait_for(server, job["id"])
    assert done["progress"] == 100 and done["completed_at"] >= done["created_at"] and done["error"] is None
    content = httpx.get(f"http://{server}/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    (tmp_path / "v.mp4").write_bytes(content.content)
    assert read_video(tmp_path / "v.mp4").shape == (11, 16, 16, 3)
    listed = httpx.get(f"http://{server}/v1/videos?limit=100").json()
    assert any(j["id"] == job["id"] for j in listed["data"])
    assert httpx.delete(f"http://{server}/v1/videos/{job['id']}").json()["deleted"] is True
    missing = httpx.get(f"http://{server}/v1/videos/{job['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_content_is_409_until_completed_and_delete_cancels(server):
    job = httpx.post(f"http://{server}/v1/videos", json={"num_frames": 400, "steps": 3}).json()
    r = httpx.get(f"http://{server}/v1/videos/{job['id']}/content")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert httpx.delete(f"http://{server}/v1/videos/{job['id']}").status_code == 200
    assert httpx.get(f"http://{server}/v1/videos/{job['id']}").status_code == 404


def test_list_pagination(server):
    ids = [httpx.post(f"http://{server}/v1/videos", json={"num_frames": 1, "steps": 1}).json()["id"] for _ in range(3)]
    for job_id in ids:
        wait_for(server, job_id)
    first = httpx.get(f"http://{server}/v1/videos?limit=2").json()
    rest = httpx.get(f"http://{server}/v1/videos?limit=2&after={first['data'][-1]['id']}").json()
    seen = [j["id"] for j in first["data"] + rest["data"]]
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen + [j["id"] for j in httpx.get(
        f"http://{server}/v1/videos?limit=100").json()["data"]])  # fmt: skip
    assert first["has_more"] is True


def test_bad_requests(server):
    url = f"http://{server}/v1/videos"
    for body, status in [
        ({}, 422),
        ({"num_frames": 0}, 422),
        ({"num_frames": 5, "sampler": "euler"}, 422),
        ({"num_frames": 5, "colour": 1}, 422),
        ({"num_frames": 10**9}, 422),  # the server's limits are in the schema (openapi.json says so)
        ({"num_frames": 5, "steps": 10**6}, 422),
        ({"num_frames": 5.0, "steps": 2.5}, 422),
        ({"num_frames": 5, "image": "!!!"}, 400),  # schema-valid, but not an image
    ]:
        r = httpx.post(url, json=body)
        assert r.status_code == status, body
        assert r.json()["error"]["code"] == "invalid_request", r.json()
    assert httpx.post(url, content=b"not json", headers={"content-type": "application/json"}).status_code == 422


def test_jobs_survive_restart_interrupted_ones_run_again(tiny_pipe, tmp_path):
    with running_server(tiny_pipe, data_dir=str(tmp_path)) as address:
        job = httpx.post(f"http://{address}/v1/videos", json={"num_frames": 9, "steps": 2, "seed": 5}).json()
        wait_for(address, job["id"])
        original = httpx.get(f"http://{address}/v1/videos/{job['id']}/content").content
    # as a process that died would leave them: a job running (its half-written file beside it), one that had been
    # interrupted twice already, one whose input image is gone, and a file of a job that no longer exists
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    columns = (
        "id, status, progress, num_frames, seed, sampler, steps, created_at, completed_at, error, attempts, has_image"
    )
    for values in [("video_rerun", "in_progress", 40, 9, 5, "ddim", 2, 1.0, None, None, 0, 0),
                   ("video_thrice", "in_progress", 40, 9, 1, "ddim", 2, 2.0, None, None, 2, 0),
                   ("video_noinput", "queued", 0, 9, 1, "ddim", 2, 3.0, None, None, 0, 1)]:  # fmt: skip
        db.execute(f"INSERT INTO jobs ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", values)
    db.commit()
    db.close()
    (tmp_path / "videos" / ".video_rerun.mp4.123.tmp").write_bytes(b"half")
    (tmp_path / "videos" / "video_gone.mp4").write_bytes(b"orphan")
    with running_server(tiny_pipe, data_dir=str(tmp_path)) as address:
        assert httpx.get(f"http://{address}/v1/videos/{job['id']}/content").content == original
        rerun = wait_for(address, "video_rerun")  # from the start: the same seed gives the same video
        assert rerun["status"] == "completed"
        assert httpx.get(f"http://{address}/v1/videos/video_rerun/content").content == original
        thrice = httpx.get(f"http://{address}/v1/videos/video_thrice").json()
        assert thrice["status"] == "failed" and "3 times" in thrice["error"]
        noinput = httpx.get(f"http://{address}/v1/videos/video_noinput").json()
        assert noinput["status"] == "failed" and "input image was lost" in noinput["error"]
        assert httpx.get(f"http://{address}/v1/videos/video_thrice/content").status_code == 409
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == sorted([f"{job['id']}.mp4", "video_rerun.mp4"])


def test_rest_requires_the_key(tiny_pipe):
    with running_server(tiny_pipe, api_key="k") as address:
        r = httpx.post(f"http://{address}/v1/videos", json={"num_frames": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"http://{address}/v1/videos").status_code == 401
        ok = httpx.post(f"http://{address}/v1/videos", json={"num_frames": 1, "steps": 1},
                        headers={"Authorization": "Bearer k"})  # fmt: skip
        assert ok.status_code == 202
