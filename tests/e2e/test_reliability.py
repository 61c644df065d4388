"""Reliability and security against a real server on loopback (CPU, tiny model): load, cancellation storms,
slow and hostile clients, injected faults, SIGKILL restarts, access control. docs/reliability.md summarises."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ca2vdm.server.media import JpegEncoder
from ca2vdm.server.model.generate import generate_video
from tests.api.conftest import APPS, running_server

NUM = 64


def metrics(address: str, key: str | None = None) -> dict[str, float]:
    """Metric lines without histogram buckets, keyed by name with labels (e.g. ca2vdm_sessions_total{...})."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = {}
    for line in httpx.get(f"http://{address}/metrics", headers=headers).text.splitlines():
        if line.startswith("ca2vdm_") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def assert_idle(address: str, timeout: float = 20.0) -> dict[str, float]:
    """No leaked pages, no stuck sessions: nothing runs or waits, and the only pages in use are those of detached
    sessions (a client whose connection died without a close frame: kept for a resume), one queue each at most."""
    deadline = time.monotonic() + timeout
    max_sessions = APPS[address].state.settings.max_sessions
    while True:
        m = metrics(address)
        detached = m["ca2vdm_sessions_detached"]
        used = m["ca2vdm_cache_pages_total"] - m["ca2vdm_cache_pages_free"]
        if used <= detached * (m["ca2vdm_cache_pages_total"] // max_sessions) \
                and m["ca2vdm_sessions_active"] == detached and m["ca2vdm_sessions_waiting"] == 0:  # fmt: skip
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


async def stream(address: str, start: dict, *, behaviour: str = "read", rng: random.Random | None = None) -> dict:
    """One client. behaviour: read (to the end), or a way to leave early: close_before_ready, close_after_ready,
    close_mid_clip (after a clip header, before its media), stop (send stop after the first clip)."""
    result: dict = {"jpegs": [], "messages": [], "code": None}
    async with connect(f"ws://{address}/v1/stream", max_size=2**24) as ws:
        try:
            await ws.send(json.dumps(start))
        except ConnectionClosed:  # refused on connect (a missing key) before the start went out: read why below
            pass
        if behaviour == "close_before_ready":
            return result
        media_left, clip_end, per_clip = 0, 0, None  # acknowledge each clip once its media are in
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    result["jpegs"].append(msg)
                    media_left -= 1
                    if media_left == 0:
                        try:
                            await ws.send(json.dumps({"type": "ack", "frames": clip_end}))
                        except ConnectionClosed:  # the server finished meanwhile: its done is still to be read
                            pass
                    continue
                data = json.loads(msg)
                result["messages"].append(data)
                if data["type"] == "ready":
                    per_clip = data["format"]
                if data["type"] == "clip":
                    media_left = 1 if per_clip == "fmp4" else data["num_frames"]
                    clip_end = data["first_frame"] + data["num_frames"]
                if behaviour == "close_after_ready" and data["type"] == "ready":
                    return result
                if data["type"] == "clip" and behaviour == "close_mid_clip":
                    if rng is None or rng.random() < 0.5:
                        return result
                if data["type"] == "clip" and behaviour == "stop":
                    await ws.send(json.dumps({"type": "stop"}))
                    behaviour = "read"
        except ConnectionClosed:
            pass
        result["code"] = ws.close_code
    return result


def decode(jpegs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), dtype=np.int16) for j in jpegs])


def test_load_64_sessions_each_equal_to_its_solo_run(tiny_pipe):
    starts = [{"type": "start", "seed": i, "steps": 2, "num_frames": 9, "format": "jpeg",
               "sampler": "ddim" if i % 2 else "iddpm"} for i in range(NUM)]  # fmt: skip
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with running_server(tiny_pipe, max_sessions=16, max_batch=16, max_waiting=NUM,
                        max_sessions_per_client=0) as address:  # fmt: skip

        async def main():
            return await asyncio.gather(*(stream(address, s) for s in starts))

        results = asyncio.run(main())
        m = assert_idle(address)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    encoder = JpegEncoder()
    for start, r in zip(starts, results, strict=True):
        assert r["code"] == 1000 and r["messages"][-1] == {"type": "done", "frames": 9}, r["messages"][-3:]
        solo = generate_video(
            tiny_pipe, tiny_pipe.sampler(start["sampler"], 2), image=None, num_frames=9, seed=start["seed"]
        )
        expected = decode(encoder.encode(solo, 0))
        assert np.abs(decode(r["jpegs"]) - expected).mean() < 0.5, start
    assert m['ca2vdm_sessions_total{outcome="completed"}'] == NUM
    assert rss_growth_mb < 1024, f"server process grew by {rss_growth_mb:.0f} MB"


def test_cancellation_storm_leaks_nothing(tiny_pipe):
    rng = random.Random(7)
    behaviours = ["read"] * (NUM // 2) + [rng.choice(["close_before_ready", "close_after_ready", "close_mid_clip",
                                                       "stop"]) for _ in range(NUM // 2)]  # fmt: skip
    rng.shuffle(behaviours)
    with running_server(tiny_pipe, max_sessions=16, max_batch=16, max_waiting=NUM,
                        max_sessions_per_client=0) as address:  # fmt: skip

        async def main():
            tasks = []
            for i, b in enumerate(behaviours):
                start = {"type": "start", "seed": i, "steps": 2, "format": "jpeg",
                         "num_frames": 17 if b == "read" else None}  # fmt: skip
                tasks.append(stream(address, start, behaviour=b, rng=rng))
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
        m = assert_idle(address)
    for b, r in zip(behaviours, results, strict=True):
        if b == "read":  # survivors are unaffected
            assert r["code"] == 1000 and r["messages"][-1] == {"type": "done", "frames": 17} and len(r["jpegs"]) == 17
        if b == "stop":
            assert r["messages"][-1]["type"] == "done" and r["code"] == 1000
    assert m["ca2vdm_cache_pages_free"] == m["ca2vdm_cache_pages_total"]


def _pipe_64px():
    """A tiny random model at 64x64 pixels: its (noise) JPEGs are ~10 KB, so socket buffers fill in seconds."""
    import torch

    from ca2vdm.server.model.codecs import PixelCodec
    from ca2vdm.server.model.config import ModelConfig, PipelineConfig
    from ca2vdm.server.model.loader import Pipeline
    from ca2vdm.server.model.stdit import CausalSTDiT

    cfg = PipelineConfig(model=ModelConfig(input_size=(8, 64, 64), in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                           patch_size=(1, 4, 4)), codec="pixel")  # fmt: skip
    model = CausalSTDiT(cfg.model).randomize_(0, std_scale=0.3).eval()
    return Pipeline("test:64px", cfg, model, PixelCodec(), torch.device("cpu"))


def test_slow_reader_pauses_while_others_keep_their_rate():
    """A client that stops reading (small receive buffer, no acknowledgements): its session falls more than
    max_pending_clips clips behind and pauses — pages kept, nothing generated, server memory bounded by those clips —
    while other sessions finish."""
    with running_server(_pipe_64px(), max_sessions=8, max_batch=8) as address:
        engine = APPS[address].state.engine
        host, port = address.split(":")

        async def main():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            async with connect(f"ws://{address}/v1/stream", sock=sock, max_size=2**24, max_queue=1) as slow:
                await slow.send(json.dumps({"type": "start", "seed": 1, "steps": 1, "format": "jpeg"}))
                await slow.recv()  # ready, then read nothing
                starts = [
                    {"type": "start", "seed": 10 + i, "steps": 1, "num_frames": 41, "format": "jpeg"} for i in range(3)
                ]
                fast = await asyncio.gather(*(stream(address, start) for start in starts))
                deadline = time.monotonic() + 90
                while not any(s.state.value == "paused" for s in list(engine.scheduler.active)):
                    assert time.monotonic() < deadline, "the slow session never paused"
                    await asyncio.sleep(0.05)
                paused = next(s for s in list(engine.scheduler.active) if s.state.value == "paused")
                produced, pending = paused.frames_done, paused.pending
                await asyncio.sleep(1.0)
                return fast, produced, pending, paused.frames_done

        fast, produced, pending, later = asyncio.run(main())
        assert all(r["messages"][-1] == {"type": "done", "frames": 41} for r in fast)
        assert pending[0] <= 5 and later == produced, (pending, produced, later)  # no generation while paused
        assert produced < 5000, produced
        assert_idle(address)  # the disconnect at the end cancels it and frees its pages


def huge_png(width: int, height: int) -> str:
    """A valid PNG header declaring absurd dimensions (the pixel data is never read)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


HOSTILE = [
    '{"type": "start", "steps": 1e30}',
    '{"type": "start", "steps": -5}',
    '{"type": "start", "seed": NaN}',
    '{"type": "start", "num_frames": Infinity}',
    '{"type": "start", "seed": 99999999999999999999999999}',
    '{"type": "start", "steps": [1, 2]}',
    '{"type": "start", "sampler": {"$ne": 1}}',
    '{"type": "start", "image": 12}',
    '{"type": "start", "image": "===="}',
    '{"type": "start", "image": "' + base64.b64encode(b"not an image at all" * 10).decode() + '"}',
    '{"type": "start", "image": "' + huge_png(100_000, 100_000) + '"}',
    '["start"]',
    "null",
    '{"type": "start"',
    '{"type": "stop"}',
]


def test_hostile_inputs_get_the_documented_error_and_others_keep_working(tiny_pipe):
    with running_server(tiny_pipe, max_message_bytes=64 * 1024, max_sessions_per_client=0) as address:

        async def hostile(text):
            msgs = []
            async with connect(f"ws://{address}/v1/stream") as ws:
                await ws.send(text)
                try:
                    async for m in ws:
                        msgs.append(json.loads(m))
                except ConnectionClosed:
                    pass
                return msgs, ws.close_code

        async def oversized():
            try:
                async with connect(f"ws://{address}/v1/stream", max_size=2**24) as ws:
                    await ws.send("x" * (200 * 1024))
                    async for _ in ws:
                        pass
                    return ws.close_code
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None

        async def main():
            good = asyncio.create_task(
                stream(address, {"type": "start", "steps": 2, "num_frames": 17, "format": "jpeg"})
            )
            bad = await asyncio.gather(*(hostile(t) for t in HOSTILE))
            too_big = await oversized()
            return bad, too_big, await good

        bad, too_big, good = asyncio.run(main())
        for text, (msgs, code) in zip(HOSTILE, bad, strict=True):
            assert code == 1008 and msgs[-1]["type"] == "error" and msgs[-1]["code"] == "invalid_request", (text, msgs)
        assert too_big in (1009, 1008), too_big  # message too big
        assert good["messages"][-1] == {"type": "done", "frames": 17}
        assert_idle(address)


def test_injected_faults_fail_only_their_sessions(tiny_pipe):
    with running_server(tiny_pipe, max_sessions=8, max_batch=1) as address:
        engine = APPS[address].state.engine

        def runner_fault(stage, sessions):
            if stage == "denoise" and any(s.params.seed == 666 for s in sessions):
                raise RuntimeError("injected runner fault")

        engine.fault_hook = runner_fault

        async def main():
            victim = asyncio.create_task(stream(address, {"type": "start", "seed": 666, "steps": 2, "num_frames": 9,
                                                          "format": "jpeg"}))  # fmt: skip
            bystander = asyncio.create_task(stream(address, {"type": "start", "seed": 1, "steps": 2, "num_frames": 9,
                                                             "format": "jpeg"}))  # fmt: skip
            return await victim, await bystander

        victim, bystander = asyncio.run(main())
        assert (
            victim["messages"][-1]["code"] == "internal"
            and "injected runner fault" in victim["messages"][-1]["message"]
        )
        assert victim["code"] == 1011
        assert bystander["messages"][-1] == {"type": "done", "frames": 9}

        # an encoder failure fails its session only
        engine.fault_hook = None
        real_encode = JpegEncoder.encode

        def broken(self, frames, first_frame):
            if first_frame > 0:
                raise OSError("injected encoder fault")
            return real_encode(self, frames, first_frame)

        JpegEncoder.encode = broken
        try:
            victim = asyncio.run(stream(address, {"type": "start", "seed": 3, "steps": 2, "num_frames": 17,
                                                  "format": "jpeg"}))  # fmt: skip
        finally:
            JpegEncoder.encode = real_encode
        assert "injected encoder fault" in victim["messages"][-1]["message"] and victim["code"] == 1011
        after = asyncio.run(
            stream(address, {"type": "start", "seed": 4, "steps": 2, "num_frames": 9, "format": "fmp4"})
        )
        assert after["messages"][-1] == {"type": "done", "frames": 9} and engine.alive
        m = assert_idle(address)
        assert m['ca2vdm_sessions_total{outcome="failed"}'] == 2


def _serve(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "CA2VDM_DATA_DIR": str(data_dir), "CA2VDM_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "ca2vdm.server.cli", "serve", "--model", "random:tiny", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_jobs_survive_sigkill_and_sigterm_and_a_deleted_job_leaves_no_file(tmp_path):
    """SIGKILL mid-job: completed jobs keep their files byte for byte, the interrupted ones run again from the
    start on the next start (never served half-written). SIGTERM: the server stops cleanly and its running jobs
    stay queued. DELETE of a running job: no file appears, now or after a restart."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1/videos"

    def status(job_id):
        return httpx.get(f"{base}/{job_id}").json()["status"]

    proc = _serve(tmp_path, port)
    try:
        _wait_ready(port, proc)
        done = [httpx.post(base, json={"num_frames": 9, "steps": 1, "seed": i}).json()["id"] for i in range(3)]
        for job_id in done:
            deadline = time.monotonic() + 60
            while status(job_id) != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        contents = {j: httpx.get(f"{base}/{j}/content").content for j in done}
        running = [httpx.post(base, json={"num_frames": 5000, "steps": 4, "seed": i}).json()["id"] for i in range(3)]
        time.sleep(1.0)
        assert any(status(j) == "in_progress" for j in running)
        half_written = {p.name for p in (tmp_path / "videos").glob(".*.tmp")}
        assert half_written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc = _serve(tmp_path, port)
    try:
        _wait_ready(port, proc)
        for job_id, content in contents.items():
            assert status(job_id) == "completed"
            assert httpx.get(f"{base}/{job_id}/content").content == content
        for job_id in running:
            assert status(job_id) in ("queued", "in_progress")  # running again
            assert httpx.get(f"{base}/{job_id}/content").status_code == 409
        assert not half_written & {p.name for p in (tmp_path / "videos").iterdir()}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")  # the graceful stop put them back in the queue, no attempt lost
    marks = db.execute(f"SELECT status, attempts FROM jobs WHERE id IN ({','.join('?' * len(running))})",
                       running).fetchall()  # fmt: skip
    db.close()
    assert marks == [("queued", 1)] * len(running)
    proc = _serve(tmp_path, port)
    try:
        _wait_ready(port, proc)
        assert all(status(j) in ("queued", "in_progress") for j in running)
        for job_id in running:
            assert httpx.delete(f"{base}/{job_id}").status_code == 200
        time.sleep(1.0)
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == sorted(f"{j}.mp4" for j in done)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == sorted(f"{j}.mp4" for j in done)


def test_no_route_works_without_the_key(tiny_pipe):
    with running_server(tiny_pipe, api_key="key-123") as address:
        app = APPS[address]
        public = {"/healthz", "/readyz", "/"}
        checked = 0
        for path, operations in app.openapi()["paths"].items():  # every HTTP route of the API
            if path in public:
                continue
            for method in operations:
                url = f"http://{address}{path.replace('{job_id}', 'video_x')}"
                r = httpx.request(method.upper(), url, json={"num_frames": 1})
                assert r.status_code == 401, (method, path, r.status_code)
                checked += 1
        assert checked >= 6
        assert metrics(address, key="key-123")["ca2vdm_frames_generated_total"] == 0
        r = asyncio.run(stream(address, {"type": "start", "steps": 1, "num_frames": 1}))
        assert r["messages"][-1]["code"] == "unauthorized" and r["code"] == 1008
        assert metrics(address, key="key-123")["ca2vdm_frames_generated_total"] == 0
        assert httpx.get(f"http://{address}/v1/videos", headers={"Authorization": "Bearer key-12"}).status_code == 401


@pytest.fixture(autouse=True)
def _deterministic():
    random.seed(0)
