"""WS /v1/stream against a real server on loopback: the DESIGN.md protocol, end to end."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ca2vdm.server.media import read_video
from tests.api.conftest import running_server
from tests.images import smooth_image


def png_b64(h=40, w=56) -> str:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(h, w).numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_stream(address, start, stop_after_clips=None, headers=None, ack=True):
    """Messages of one stream: list of ("json", dict) / ("bytes", bytes), and the close code."""
    out = []
    with connect(f"ws://{address}/v1/stream", additional_headers=headers, max_size=2**25) as ws:
        try:
            ws.send(json.dumps(start) if isinstance(start, dict) else start)
        except ConnectionClosed:  # refused before it could send (e.g. unauthorized): read what came
            pass
        clips, media_left, clip_end, fmt = 0, 0, 0, None
        try:
            while True:
                msg = ws.recv(timeout=60)
                if isinstance(msg, bytes):
                    out.append(("bytes", msg))
                    media_left -= 1
                    if media_left == 0 and ack:  # the clip's media are in: acknowledge it
                        try:
                            ws.send(json.dumps({"type": "ack", "frames": clip_end}))
                        except ConnectionClosed:
                            pass
                    continue
                data = json.loads(msg)
                out.append(("json", data))
                if data["type"] == "ready":
                    fmt = data["format"]
                if data["type"] == "clip":
                    clips += 1
                    media_left = 1 if fmt == "fmp4" else data["num_frames"]
                    clip_end = data["first_frame"] + data["num_frames"]
                    if stop_after_clips is not None and clips == stop_after_clips:
                        ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        return out, ws.close_code


def metric(address, name):
    text = httpx.get(f"http://{address}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_fmp4_stream_of_n_frames_decodes_to_n_frames(server, tmp_path):
    msgs, code = run_stream(server, {"type": "start", "image": png_b64(), "seed": 3, "steps": 3, "num_frames": 17,
                                     "format": "fmp4"})  # fmt: skip
    assert code == 1000
    ready = msgs[0][1]
    assert ready["type"] == "ready" and (ready["width"], ready["height"]) == (16, 16) and ready["fps"] == 8
    assert ready["mime"].startswith("video/mp4") and msgs[1][0] == "bytes"  # the init segment
    clips = [m for kind, m in msgs if kind == "json" and m["type"] == "clip"]
    assert [(c["first_frame"], c["num_frames"]) for c in clips] == [(0, 1), (1, 8), (9, 8)]
    assert msgs[-1] == ("json", {"type": "done", "frames": 17})
    path = tmp_path / "stream.mp4"
    path.write_bytes(b"".join(m for kind, m in msgs if kind == "bytes"))
    assert read_video(path).shape == (17, 16, 16, 3)


def test_jpeg_stream_without_image(server):
    msgs, code = run_stream(server, {"type": "start", "steps": 2, "num_frames": 9, "format": "jpeg"})
    jpegs = [m for kind, m in msgs if kind == "bytes"]
    assert code == 1000 and len(jpegs) == 9
    assert all(Image.open(io.BytesIO(j)).size == (16, 16) for j in jpegs)


def test_stop_mid_stream_ends_cleanly_and_frees_the_cache(server):
    msgs, code = run_stream(server, {"type": "start", "steps": 2, "format": "jpeg"}, stop_after_clips=2)
    assert code == 1000 and msgs[-1][1]["type"] == "done"
    deadline = time.monotonic() + 10
    while metric(server, "ca2vdm_cache_pages_free") != metric(server, "ca2vdm_cache_pages_total"):
        assert time.monotonic() < deadline, "pages not freed"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "start, reason",
    [
        ("not json", "bad start message"),
        ({"type": "begin"}, "bad start message"),
        ({"type": "start", "steps": -1}, "bad start message"),
        ({"type": "start", "steps": 10**6}, "steps: Input should be less than or equal to 1000"),
        ({"type": "start", "num_frames": 10**9}, "num_frames: Input should be less than or equal to 100000"),
        ({"type": "start", "seed": "abc"}, "bad start message"),
        ({"type": "start", "colour": "red"}, "bad start message"),
        ({"type": "start", "format": "gif"}, "bad start message"),
        ({"type": "start", "image": "%%% not base64"}, "not valid base64"),
        ({"type": "start", "image": base64.b64encode(b"GIF89a not an image").decode()}, "cannot decode image"),
        (b"\x00\x01 binary garbage", "JSON text message"),
    ],
)
def test_bad_start_messages_get_invalid_request(server, start, reason):
    msgs, code = run_stream(server, start)
    assert code == 1008
    assert msgs[-1][1]["type"] == "error" and msgs[-1][1]["code"] == "invalid_request"
    assert reason in msgs[-1][1]["message"]


def test_silent_client_is_timed_out(server):
    with connect(f"ws://{server}/v1/stream") as ws:
        data = json.loads(ws.recv(timeout=10))
        assert data["code"] == "invalid_request" and "no start message" in data["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1008


def test_busy_server_refuses_with_1013(tiny_pipe):
    with running_server(tiny_pipe, max_sessions=1, max_waiting=0) as address:
        with connect(f"ws://{address}/v1/stream") as first:
            first.send(json.dumps({"type": "start", "steps": 2, "format": "jpeg"}))
            assert json.loads(first.recv(timeout=30))["type"] == "ready"
            msgs, code = run_stream(address, {"type": "start", "steps": 2})
            assert code == 1013 and msgs[-1][1]["code"] == "server_busy"


def test_api_key_is_required_before_any_work(tiny_pipe):
    with running_server(tiny_pipe, api_key="s3cret") as address:
        msgs, code = run_stream(address, {"type": "start", "steps": 2, "num_frames": 1})
        assert code == 1008 and msgs[-1][1]["code"] == "unauthorized"
        assert metric_with_key(address) == 0  # nothing was generated
        msgs, code = run_stream(address, {"type": "start", "steps": 2, "num_frames": 3, "format": "jpeg"},
                                headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        assert code == 1000 and msgs[-1][1] == {"type": "done", "frames": 3}
        assert httpx.get(f"http://{address}/v1/models").status_code == 401
        assert httpx.get(f"http://{address}/v1/models?api_key=s3cret").status_code == 200
        assert httpx.get(f"http://{address}/healthz").status_code == 200


def metric_with_key(address):
    text = httpx.get(f"http://{address}/metrics", headers={"Authorization": "Bearer s3cret"}).text
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("ca2vdm_frames_generated_total")
    )


def test_health_models_metrics(server):
    assert httpx.get(f"http://{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"http://{server}/readyz").status_code == 200
    info = httpx.get(f"http://{server}/v1/models").json()
    assert info["chunk_frames"] == 8 and info["max_cache_frames"] == 25
    assert info["samplers"] == ["ddim", "iddpm", "dpm++2m"]
    assert info["schedules"][0] == {"sampler": info["default_sampler"], "steps": info["default_steps"]}
    text = httpx.get(f"http://{server}/metrics").text
    names = ["ca2vdm_sessions_active", "ca2vdm_sessions_waiting", "ca2vdm_sessions_total", "ca2vdm_cache_pages_total",
             "ca2vdm_cache_pages_free", "ca2vdm_time_to_first_clip_seconds_bucket", "ca2vdm_clip_interval_seconds",
             "ca2vdm_frames_generated_total", "ca2vdm_batch_size", "ca2vdm_denoise_step_seconds"]  # fmt: skip
    for name in names:
        assert name in text, name


def test_eight_concurrent_streams_complete(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return run_stream(server, {"type": "start", "seed": i, "steps": 2, "num_frames": 12 + i, "format": "jpeg"})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, (msgs, code) in enumerate(results):
        assert code == 1000 and msgs[-1][1] == {"type": "done", "frames": 12 + i}
        assert sum(1 for kind, _ in msgs if kind == "bytes") == 12 + i
