"""Resuming a stream: how close a rebuilt continuation is to the uninterrupted one, and how long a reconnecting viewer
waits for its first clip.

1. Closeness (in process, the engine alone): one stream runs uninterrupted; then the same stream (same seed) is
   detached after c clips, unloaded at once (grace 0, its pages freed) and resumed, which rebuilds its cache from the
   kept history in one write. For each c: PSNR of the next clip, and of the rest of the stream, against the
   uninterrupted frames, and whether the queue had dequeued before the drop (only then can they differ by more than
   float rounding). The exact path (detach, resume within the grace period) is checked for equality.
2. Latency (the real server on loopback, websocket clients, pace realtime): a viewer whose TCP connection is cut in
   the middle of a clip reconnects at once with its resume token; the time from the resume message to its first
   clip, for the exact path (within the grace period: resent clips) and the rebuilt one (grace 0).

    python bench/resume.py --out bench/results/resume_cpu.json          # the packaged default model, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ca2vdm.server.api.serving import serve_in_thread
from ca2vdm.server.benchmark.timing import git_commit
from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.media.image import load_image
from ca2vdm.server.model.loader import load_pipeline

SAMPLE = Path(__file__).resolve().parents[1] / "server" / "api" / "static" / "samples" / "sprites.png"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# ---- 1. closeness ------------------------------------------------------------------------------------------------


async def _frames(handle) -> list:
    return [clip async for clip in handle]


async def _take(handle, n: int) -> list:
    clips, it = [], handle.__aiter__()
    for _ in range(n):
        clips.append(await it.__anext__())
        handle.ack(clips[-1].end_frame)
    return clips


async def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.005)


async def closeness(pipe, params: SessionParams, drops: list[int]) -> dict:
    cfg = EngineConfig(max_lead_s=3600.0, max_pending_clips=1, max_sessions=2, max_batch=2, resume_grace_s=0.0)
    engine = Engine(pipe, cfg).start()
    try:
        reference = await _frames(await engine.start_session(params))
        ref = torch.cat([c.frames for c in reference])
        rows = []
        for c in drops:
            handle = await engine.start_session(params, auto_ack=False, resumable=True)
            got = await _take(handle, c)
            k = got[-1].end_frame
            handle.detach()
            await _wait(lambda h=handle: h.session.id in engine.runner.unloaded)
            kept = engine.runner.unloaded[handle.session.id]
            t0 = time.perf_counter()
            resumed = await engine.resume(handle.info.resume_token, k)
            rest = await _frames(resumed)
            out = torch.cat([c.frames for c in got + rest])
            assert out.shape == ref.shape
            nxt = slice(k, rest[0].end_frame)
            rows.append({
                "clips_before_drop": c,
                "frames_before_drop": k,
                "kept_frames": kept.history.shape[2],
                "dequeued_before_drop": kept.first_frame > 0,
                "psnr_next_clip_db": round(psnr(out[nxt], ref[nxt]), 2),
                "psnr_rest_db": round(psnr(out[k:], ref[k:]), 2),
                "psnr_rest_by_clip_db": [round(psnr(out[r.first_frame : r.end_frame], ref[r.first_frame : r.end_frame]),
                                               2) for r in rest],  # fmt: skip
                "max_abs_diff_rest": int((out[k:].int() - ref[k:].int()).abs().max()),
                "resume_to_end_s": round(time.perf_counter() - t0, 3),
            })  # fmt: skip
            print(f"drop after {c} clips (frame {k}, dequeued {rows[-1]['dequeued_before_drop']}): next clip "
                  f"{rows[-1]['psnr_next_clip_db']} dB, rest {rows[-1]['psnr_rest_db']} dB")  # fmt: skip
        # the exact path: detach and resume within the grace period (here: a config with a long one)
        return {"rows": rows, "reference_frames": ref.shape[0]}
    finally:
        engine.stop()


async def exact_equality(pipe, params: SessionParams, c: int) -> bool:
    cfg = EngineConfig(max_lead_s=3600.0, max_pending_clips=1, max_sessions=2, max_batch=2)
    engine = Engine(pipe, cfg).start()
    try:
        ref = torch.cat([x.frames for x in await _frames(await engine.start_session(params))])
        handle = await engine.start_session(params, auto_ack=False, resumable=True)
        got = await _take(handle, c)
        handle.detach()
        await _wait(lambda: handle.session.state.is_detached)
        rest = await _frames(await engine.resume(handle.info.resume_token, got[-1].end_frame))
        return bool(torch.equal(torch.cat([x.frames for x in got + rest]), ref))
    finally:
        engine.stop()


# ---- 2. latency through the server -------------------------------------------------------------------------------


async def viewer(address: str, start: dict, drops: int, clips_between: int, pause_s: float) -> dict:
    """A viewer that cuts its TCP connection in the middle of every `clips_between`-th clip, `drops` times, and
    resumes after `pause_s`; the time from each resume message to the first clip on the new connection."""
    frames, latencies, first, token = 0, [], start, None
    clip_count = 0
    while True:
        sent = time.monotonic()
        dropped = False
        async with connect(f"ws://{address}/v1/stream", max_size=2**24) as ws:
            await ws.send(json.dumps(first))
            left, end, seen_clip = 0, 0, False
            try:
                async for msg in ws:
                    if isinstance(msg, bytes):
                        if end == 0:
                            continue  # the init segment
                        left -= 1
                        if left == 0:
                            frames = end
                            with contextlib.suppress(ConnectionClosed):  # the server may have finished meanwhile
                                await ws.send(json.dumps({"type": "ack", "frames": end}))
                        continue
                    data = json.loads(msg)
                    if data["type"] == "ready":
                        token = data["resume_token"]
                    elif data["type"] == "clip":
                        if not seen_clip and first["type"] == "resume":
                            latencies.append(time.monotonic() - sent)
                        seen_clip = True
                        clip_count += 1
                        left, end = 1, data["first_frame"] + data["num_frames"]
                        if drops and clip_count % clips_between == 0:
                            ws.transport.abort()  # mid-clip: its header is in, its media is not
                            dropped = True
                            break
                    else:
                        return {"frames": frames, "latencies_s": latencies, "end": data}
            except ConnectionClosed:
                pass
        if not dropped:
            return {"frames": frames, "latencies_s": latencies, "end": None}
        drops -= 1
        await asyncio.sleep(pause_s)
        first = {"type": "resume", "token": token, "from_frame": frames}


def latency(pipe, image_b64: str, kind: str, drops: int) -> dict:
    grace = 30.0 if kind == "exact" else 0.0
    start = {"type": "start", "image": image_b64, "seed": 1, "num_frames": 1 + 8 * (3 * drops + 4), "format": "fmp4"}
    with (
        tempfile.TemporaryDirectory() as data_dir,
        serve_in_thread(pipe, resume_grace_s=grace, max_connections_per_s=0, data_dir=data_dir) as (address, app),
    ):
        result = asyncio.run(viewer(address, start, drops, clips_between=3, pause_s=0.3 if grace == 0 else 0.0))
        resumes = dict(app.state.engine.stats.resumes)
    lat = result["latencies_s"]
    return {
        "kind": kind,
        "drops": drops,
        "resumes": resumes,
        "frames": result["frames"],
        "end": result["end"],
        "resume_to_first_clip_s": [round(x, 3) for x in lat],
        "median_s": round(statistics.median(lat), 3) if lat else None,
        "max_s": round(max(lat), 3) if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the packaged default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=int, default=10, help="clips per stream in the closeness runs")
    ap.add_argument("--drops", type=int, default=5, help="connection drops per latency run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    pipe = load_pipeline(args.model, device=args.device)
    h, w = pipe.frame_size
    image = load_image(SAMPLE.read_bytes(), size=(h, w))
    params = SessionParams(image=image, seed=3, num_frames=1 + pipe.config.chunk_frames * args.clips)
    drops = [c for c in (1, 2, 3, 4, 5, 7) if c < args.clips]
    result = {
        "benchmark": "resume",
        "command": "python bench/resume.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "commit": git_commit(),
        "machine": {
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "model": pipe.name,
        "cache": {
            "max_cache_frames": pipe.config.max_cache_frames,
            "chunk_frames": pipe.config.chunk_frames,
            "steps": pipe.config.default_steps,
        },  # fmt: skip
    }
    result["exact_resume_equal"] = asyncio.run(exact_equality(pipe, params, 3))
    print("exact resume equals the uninterrupted stream:", result["exact_resume_equal"])
    result["closeness"] = asyncio.run(closeness(pipe, params, drops))
    image_b64 = base64.b64encode(SAMPLE.read_bytes()).decode()
    result["latency"] = [latency(pipe, image_b64, kind, args.drops) for kind in ("exact", "rebuilt")]
    for row in result["latency"]:
        print(f"{row['kind']}: resume -> first clip median {row['median_s']} s, max {row['max_s']} s "
              f"({row['resumes']})")  # fmt: skip
    result["clip_interval_s"] = pipe.config.chunk_frames / pipe.config.fps
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
