"""The Python client and `ca2vdm-client` against a real server on loopback (tiny model, 16x16 frames)."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image

from ca2vdm.client import (
    ApiError,
    Clip,
    Done,
    JobFailed,
    JobsClient,
    Ready,
    StreamClient,
    StreamError,
    TransportError,
)
from ca2vdm.client._util import http_base, stream_url
from ca2vdm.client.cli import main
from tests.client.conftest import API_KEY

ROOT = Path(__file__).resolve().parents[2]


def png_bytes(w: int = 56, h: int = 40) -> bytes:
    im = Image.new("RGB", (w, h))
    im.putdata([(4 * x % 256, 6 * y % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def decoded_sizes(src: Path | bytes) -> list[tuple[int, int]]:
    """(width, height) of every frame PyAV decodes from an MP4 file or its bytes."""
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as container:
        return [(f.width, f.height) for f in container.decode(video=0)]


def collect(client: StreamClient, stop_after_clips: int | None = None, **kwargs) -> list:
    async def run() -> list:
        events, clips = [], 0
        async with aclosing(client.stream(**kwargs)) as stream:
            async for event in stream:
                events.append(event)
                if isinstance(event, Clip):
                    clips += 1
                    if clips == stop_after_clips:
                        await client.stop()
        return events

    return asyncio.run(run())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- library ----------------------------------------------------------------------------------------------------


def test_import_needs_no_torch_numpy_or_server():
    code = "import sys, client, client.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert not loaded & {"torch", "numpy", "server", "av", "PIL"}, loaded & {"torch", "numpy", "server"}


def test_url_normalisation():
    assert stream_url("http://h:1") == "ws://h:1/v1/stream"
    assert stream_url("https://h/") == "wss://h/v1/stream"
    assert stream_url("h:1") == "ws://h:1/v1/stream"
    assert stream_url("ws://h:1/v1/stream") == "ws://h:1/v1/stream"
    assert stream_url("http://h/prefix") == "ws://h/prefix/v1/stream"
    assert http_base("wss://h:1/v1/stream") == "https://h:1"
    assert http_base("127.0.0.1:8000") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError):
        stream_url("ftp://h")


def test_stream_fmp4_decodes_to_n_frames(server):
    events = collect(StreamClient(f"http://{server}"), image=png_bytes(), seed=3, steps=1, num_frames=17)
    ready, clips, done = events[0], events[1:-1], events[-1]
    assert isinstance(ready, Ready) and (ready.width, ready.height, ready.fps) == (16, 16, 8)
    assert ready.format == "fmp4" and ready.mime.startswith("video/mp4") and ready.init_segment
    assert all(isinstance(c, Clip) and len(c.media) == 1 for c in clips)
    assert [(c.index, c.first_frame, c.num_frames) for c in clips] == [(0, 0, 1), (1, 1, 8), (2, 9, 8)]
    assert done == Done(17)
    data = ready.init_segment + b"".join(c.media[0] for c in clips)
    assert decoded_sizes(data) == [(16, 16)] * 17


def test_stream_jpeg_with_image_path(server, tmp_path):
    image = tmp_path / "cond.png"
    image.write_bytes(png_bytes())
    events = collect(StreamClient(f"ws://{server}"), image=image, steps=1, num_frames=9, format="jpeg")
    assert isinstance(events[0], Ready) and events[0].init_segment is None and events[0].mime == "image/jpeg"
    jpegs = [m for e in events if isinstance(e, Clip) for m in e.media]
    assert len(jpegs) == 9 and all(Image.open(io.BytesIO(j)).size == (16, 16) for j in jpegs)
    assert events[-1] == Done(9)


def test_stop_mid_stream_ends_with_done(server):
    events = collect(StreamClient(server), stop_after_clips=2, steps=1, format="jpeg")
    assert isinstance(events[-1], Done)
    clips = [e for e in events if isinstance(e, Clip)]
    assert len(clips) >= 2 and events[-1].frames == sum(c.num_frames for c in clips)


def test_stop_before_start_stops_at_once_and_early_exit_closes(server):
    client = StreamClient(server)

    async def run() -> tuple[list, list]:
        await client.stop()  # no stream yet: the next one is stopped as soon as it starts
        first = [e async for e in client.stream(steps=1, format="jpeg")]
        second = []
        async with aclosing(client.stream(steps=1)) as stream:  # leaving early closes the connection
            async for event in stream:
                second.append(event)
                break
        return first, second

    first, second = asyncio.run(run())
    assert isinstance(first[0], Ready) and isinstance(first[-1], Done)
    assert len(second) == 1 and isinstance(second[0], Ready)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"steps": 10**6}, "less than or equal to 1000"),
        ({"format": "gif"}, "bad start message"),
        ({"image": b"GIF89a"}, "image"),
    ],
)
def test_bad_request_raises_invalid_request_1008(server, kwargs, reason):
    with pytest.raises(StreamError) as info:
        collect(StreamClient(server), **kwargs)
    assert info.value.code == "invalid_request" and info.value.close_code == 1008
    assert reason in info.value.message


def test_api_key_on_the_stream(keyed_server):
    for key in (None, "wrong"):
        with pytest.raises(StreamError) as info:
            collect(StreamClient(keyed_server, api_key=key), steps=1, num_frames=1)
        assert info.value.code == "unauthorized" and info.value.close_code == 1008
    events = collect(StreamClient(keyed_server, api_key=API_KEY), steps=1, num_frames=1, format="jpeg")
    assert events[-1] == Done(1)


def test_unreachable_server_is_a_transport_error():
    with pytest.raises(TransportError):
        collect(StreamClient(f"127.0.0.1:{free_port()}", open_timeout=5), num_frames=1)
    with pytest.raises(TransportError), JobsClient(f"127.0.0.1:{free_port()}") as jobs:
        jobs.get("video_x")


def test_jobs_round_trip(server, tmp_path):
    with JobsClient(f"http://{server}") as jobs:
        job = jobs.submit(11, image=png_bytes(), seed=5, steps=1)
        assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["num_frames"] == 11
        seen = []
        done = jobs.wait(job["id"], timeout=60, poll=0.05, on_progress=seen.append)
        assert done["status"] == "completed" and done["progress"] == 100 and seen[-1] == done
        path = jobs.download(job["id"], tmp_path / "v.mp4")
        assert path == tmp_path / "v.mp4" and decoded_sizes(path) == [(16, 16)] * 11
        assert jobs.download(job["id"], tmp_path) == tmp_path / f"{job['id']}.mp4"  # a directory gets <id>.mp4
        listed = jobs.list(limit=100)
        assert listed["object"] == "list" and job["id"] in [j["id"] for j in listed["data"]]
        first = jobs.list(limit=1)
        assert len(first["data"]) == 1 and isinstance(jobs.list(limit=1, after=first["data"][0]["id"])["data"], list)
        assert jobs.delete(job["id"])["deleted"] is True
        with pytest.raises(ApiError) as info:
            jobs.get(job["id"])
        assert (info.value.status, info.value.code) == (404, "not_found")


def test_jobs_errors(server, keyed_server, tmp_path):
    with JobsClient(server) as jobs:
        with pytest.raises(ApiError) as info:
            jobs.submit(0)
        assert info.value.status == 422 and info.value.code == "invalid_request"
        running = jobs.submit(400, steps=3)
        with pytest.raises(ApiError) as info:
            jobs.download(running["id"], tmp_path / "x.mp4")
        assert (info.value.status, info.value.code) == (409, "conflict")
        assert list(tmp_path.iterdir()) == []  # no file, no temp file left behind
        jobs.delete(running["id"])
    with JobsClient(keyed_server, api_key="wrong") as jobs, pytest.raises(ApiError) as info:
        jobs.list()
    assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_wait_raises_on_failed_job():
    states = iter(
        [{"id": "v", "status": "in_progress", "progress": 10}, {"id": "v", "status": "failed", "error": "boom"}]
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=next(states)))
    with JobsClient("http://test", transport=transport) as jobs, pytest.raises(JobFailed) as info:
        jobs.wait("v", poll=0.01)
    assert info.value.status == "failed" and info.value.error == "boom" and "boom" in str(info.value)


# ---- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_stream_writes_a_fragmented_mp4(server, tmp_path, capsys):
    out = tmp_path / "s.mp4"
    assert main(["--url", f"http://{server}", "stream", "--frames", "9", "--steps", "1", "--out", str(out)]) == 0
    assert decoded_sizes(out) == [(16, 16)] * 9
    assert [p.name for p in tmp_path.iterdir()] == ["s.mp4"]  # the temp file was renamed
    assert "wrote 9 frames" in capsys.readouterr().err


def test_cli_jobs(server, tmp_path, capsys):
    url = ["--url", f"http://{server}"]
    out = tmp_path / "j.mp4"
    assert main([*url, "submit", "--frames", "5", "--steps", "1", "--seed", "1", "--wait", "--out", str(out)]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed" and decoded_sizes(out) == [(16, 16)] * 5
    assert main([*url, "status", job["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job["id"]
    again = tmp_path / "again.mp4"
    assert main([*url, "download", job["id"], "--out", str(again)]) == 0
    assert capsys.readouterr().out.strip() == str(again) and again.read_bytes() == out.read_bytes()
    assert main([*url, "submit", "--frames", "1", "--steps", "1"]) == 0  # no --wait: the queued job
    assert json.loads(capsys.readouterr().out)["status"] in ("queued", "in_progress", "completed")


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["status", "video_missing"], 1, "not_found"),
        (["download", "video_missing", "--out", "{tmp}/x.mp4"], 1, "not_found"),
        (["stream", "--frames", "1", "--steps", "1000000", "--out", "{tmp}/x.mp4"], 1, "invalid_request"),
        (["stream", "--frames", "1", "--out", "{tmp}/x.mp4", "--image", "{tmp}/missing.png"], 2, "no such file"),
        (["stream", "--frames", "1"], 2, "--out"),
        (["submit", "--steps", "1"], 2, "--frames"),
        (["stream", "--frames", "0", "--out", "{tmp}/x.mp4"], 2, "--frames"),
    ],
)
def test_cli_errors(server, tmp_path, capsys, args, code, needle):
    argv = ["--url", f"http://{server}", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_wrong_key_and_unreachable(keyed_server, tmp_path, capsys):
    out = str(tmp_path / "x.mp4")
    assert main(["--url", keyed_server, "--api-key", "nope", "stream", "--frames", "1", "--out", out]) == 1
    assert "unauthorized" in capsys.readouterr().err
    assert main(["--url", keyed_server, "--api-key", "nope", "status", "video_x"]) == 1
    assert "unauthorized" in capsys.readouterr().err
    assert main(["--url", f"127.0.0.1:{free_port()}", "status", "video_x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err


def test_cli_stream_until_ctrl_c(server, tmp_path):
    out = tmp_path / "live.mp4"
    cmd = [sys.executable, "-m", "ca2vdm.client.cli", "--url", server, "stream", "--steps", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".part") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # a few clips
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["live.mp4"]
    frames = decoded_sizes(out)
    assert len(frames) >= 1 and set(frames) == {(16, 16)}
    assert f"wrote {len(frames)} frames" in err
