"""Resumable streams through the real server on loopback (CPU, tiny model): a client whose TCP connection drops
mid-clip (no close handshake) reconnects with its resume token and gets exactly the video an uninterrupted client
gets; after the grace period the resume is rebuilt; detached sessions are bounded; the metrics count it all."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.api.conftest import APPS, running_server
from tests.e2e.test_reliability import decode, metrics

CLIPS = 10
START = {"type": "start", "seed": 21, "steps": 2, "num_frames": 1 + 8 * (CLIPS - 1), "format": "jpeg"}


class Dropped(Exception):
    pass


async def session(address: str, first: dict, frames: list[bytes], drop_at: set[int] | None = None,
                  record: dict | None = None) -> dict:  # fmt: skip
    """One connection: send `first`, append each JPEG frame to `frames` (from the frame the server says), ack each
    clip; with `drop_at`, abort the TCP connection in the middle of the first clip whose index is in it (after part
    of its frames). Returns the ready message and the closing message."""
    drop_at = drop_at or set()
    out: dict = {"ready": None, "end": None}
    ws = await connect(f"ws://{address}/v1/stream", max_size=2**24)
    try:
        await ws.send(json.dumps(first))
        clip, left, end = None, 0, 0
        async for msg in ws:
            if isinstance(msg, bytes):
                frames.append(msg)
                left -= 1
                if clip is not None and clip["index"] in drop_at and left == clip["num_frames"] // 2:
                    drop_at.discard(clip["index"])
                    ws.transport.abort()  # no close frame, no FIN handshake: the connection just dies
                    raise Dropped
                if left == 0:
                    try:
                        await ws.send(json.dumps({"type": "ack", "frames": end}))
                    except ConnectionClosed:  # the server finished meanwhile: its done is still to be read
                        pass
                continue
            data = json.loads(msg)
            if data["type"] == "ready":
                out["ready"] = data
                if record is not None:
                    record["ready"] = data
                assert len(frames) == data["first_frame"], "the server resumes where the client says"
            elif data["type"] == "clip":
                clip, left, end = data, data["num_frames"], data["first_frame"] + data["num_frames"]
                assert data["first_frame"] == len(frames)
                if record is not None and "first_clip_at" not in record:
                    record["first_clip_at"] = time.monotonic()
            else:
                out["end"] = data
    except ConnectionClosed:
        pass
    finally:
        if ws.transport is not None and not ws.transport.is_closing():
            await ws.close()
    return out


async def with_drops(address: str, drop_at: set[int], pause_s: float = 0.0) -> tuple[list[bytes], list[float]]:
    """A client that loses its connection in the middle of the clips in `drop_at` and resumes each time."""
    frames: list[bytes] = []
    latencies: list[float] = []
    first: dict = START
    token = None
    while True:
        record: dict = {}
        sent_at = time.monotonic()
        try:
            result = await session(address, first, frames, drop_at, record)
        except Dropped:
            result = None
        if token is not None:  # a resumed connection: from the resume message to its first clip
            latencies.append(record["first_clip_at"] - sent_at)
        if result is not None:
            assert result["end"] is not None and result["end"]["type"] == "done", result
            return frames, latencies
        token = record["ready"]["resume_token"]
        await asyncio.sleep(pause_s)
        first = {"type": "resume", "token": token, "from_frame": len(frames)}


def test_three_drops_mid_clip_give_the_uninterrupted_video(tiny_pipe):
    with running_server(tiny_pipe, max_pending_clips=2) as address:
        reference: list[bytes] = []
        asyncio.run(session(address, START, reference))
        assert len(reference) == START["num_frames"]
        frames, latencies = asyncio.run(with_drops(address, {2, 5, 8}))
        assert frames == reference  # byte for byte: the same frames, each JPEG the same
        m = metrics(address)
        assert m['ca2vdm_resumes_total{kind="exact"}'] == 3
        assert m["ca2vdm_resume_seconds_count"] == 3
        assert len(latencies) == 3 and max(latencies) < 5.0
        assert m["ca2vdm_sessions_detached"] == 0 and m["ca2vdm_cache_pages_free"] == m["ca2vdm_cache_pages_total"]


def test_after_the_grace_period_the_resume_is_rebuilt(tiny_pipe):
    with running_server(tiny_pipe, resume_grace_s=0.2, max_pending_clips=1) as address:
        reference: list[bytes] = []
        asyncio.run(session(address, START, reference))
        frames, _ = asyncio.run(with_drops(address, {2}, pause_s=1.0))
        m = metrics(address)
        assert m['ca2vdm_resumes_total{kind="rebuilt"}'] == 1
        assert len(frames) == len(reference)
        # frames before the drop are the same; the continuation is close (tests/engine/test_resume.py bounds it)
        assert frames[: 8 * 2] == reference[: 8 * 2]


def test_a_flood_of_detached_sessions_holds_bounded_pages(tiny_pipe):
    """Clients that start and vanish: at most max_detached_sessions keep pages, the oldest are unloaded first, and a
    good client still gets its stream."""
    with running_server(tiny_pipe, max_sessions=6, max_detached_sessions=2, resume_grace_s=3600,
                        max_sessions_per_client=0, admission_wait_s=120) as address:  # fmt: skip
        engine = APPS[address].state.engine

        async def vanish(i: int) -> None:
            frames: list[bytes] = []
            with pytest.raises(Dropped):
                await session(address, {**START, "seed": i, "num_frames": 1000}, frames, {0})

        async def flood() -> None:
            await asyncio.gather(*(vanish(i) for i in range(12)))

        asyncio.run(flood())
        deadline = time.monotonic() + 20
        while engine.num_detached + engine.num_resumable < 12:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert engine.num_detached <= 2
        m = metrics(address)
        per_session = m["ca2vdm_cache_pages_total"] // 6
        assert m["ca2vdm_cache_pages_total"] - m["ca2vdm_cache_pages_free"] <= 2 * per_session
        good: list[bytes] = []
        result = asyncio.run(session(address, START, good))
        assert result["end"]["type"] == "done" and len(good) == START["num_frames"]


def test_bad_resumes_get_a_clear_error(tiny_pipe):
    bad = [{"type": "resume", "token": "x" * 32, "from_frame": 0},  # unknown
           {"type": "resume", "token": "", "from_frame": 0},
           {"type": "resume", "token": "x", "from_frame": -1},
           {"type": "resume", "token": "x" * 10_000, "from_frame": 0},
           {"type": "resume", "token": "x", "from_frame": 0, "extra": 1},
           {"type": "resume", "token": 17, "from_frame": 0}]  # fmt: skip
    with running_server(tiny_pipe) as address:

        async def main(message):
            async with connect(f"ws://{address}/v1/stream") as ws:
                await ws.send(json.dumps(message))
                reply = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return reply, ws.close_code

        for message in bad:
            reply, close = asyncio.run(main(message))
            assert reply["type"] == "error" and reply["code"] == "invalid_request" and close == 1008, message


def test_a_session_survives_a_graceful_restart(tiny_pipe, tmp_path):
    """The server stops (gracefully) while a viewer is disconnected; the next server process reads the session back
    from the data dir and the viewer resumes it there (rebuilt: close to the uninterrupted video)."""
    start = {**START, "seed": 33}
    with running_server(tiny_pipe, data_dir=str(tmp_path / "ref")) as address:
        reference: list[bytes] = []
        asyncio.run(session(address, start, reference))
    frames: list[bytes] = []
    record: dict = {}
    with running_server(tiny_pipe, data_dir=str(tmp_path / "data"), max_pending_clips=1) as address:
        with pytest.raises(Dropped):
            asyncio.run(session(address, start, frames, {3}, record))
        engine = APPS[address].state.engine
        deadline = time.monotonic() + 20
        while engine.num_detached == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert len(list((tmp_path / "data" / "sessions").glob("*.pt"))) == 1
    with running_server(tiny_pipe, data_dir=str(tmp_path / "data")) as address:
        resume = {"type": "resume", "token": record["ready"]["resume_token"], "from_frame": len(frames)}
        result = asyncio.run(session(address, resume, frames))
        assert result["end"] == {"type": "done", "frames": start["num_frames"]}
        assert metrics(address)['ca2vdm_resumes_total{kind="rebuilt"}'] == 1
    assert len(frames) == len(reference)
    diff = np.abs(decode(frames).astype(int) - decode(reference).astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
