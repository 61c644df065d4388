"""Scale-out on Ray Serve: real-time sessions held by 1..N engine replicas against the single server, and what the
Ray hop costs per websocket message and per REST call.

1. Capacity: `ca2vdm bench --realtime`'s ramp-and-hold (server/benchmark/realtime.py: live viewers join one a second
   until one stalls, the count is held `--hold-s` with viewers coming and going) against (a) one engine in this
   process (the single server's engine) and (b) the Ray Serve app with R engine replicas, reached through the
   ingress's own `RemoteEngine` from this process (the router, the replicas, clips crossing processes as they do to
   the ingress). Each engine gets `--torch-threads` intra-op threads (CPU) or one GPU.
2. A replica killed mid-stream (`--kill`, on the largest replica count): that many live viewers as the cluster
   held, then one replica's process gets SIGKILL. Its viewers resume with their tokens as a client does (the
   survivor has nothing of them: `expired`) and start anew, waiting at the ingress until Serve has replaced the
   replica; the other replica's viewers must not stall. Reported: stalls of those viewers, when the victims heard,
   when the replacement replica joined, when each victim saw its new first clip, and a last check that the
   whole load is held again.
3. Overhead: the same requests to the single server (uvicorn) and to the Ray app (Serve's proxy, the ingress, one
   replica), on loopback: GET /v1/models (REST through the ingress); start -> ready of a stream (a websocket message
   that reaches a replica and comes back); the interval between clips of a max-pace stream (clips crossing from
   the replica through the ingress).

    python bench/scaleout.py --replicas 1,2 --torch-threads 1 --out bench/results/scaleout_cpu.json  # 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ca2vdm.server.api.serving import serve_in_thread
from ca2vdm.server.benchmark.realtime import Viewer, _observe, _params, ramp_and_hold
from ca2vdm.server.benchmark.timing import git_commit
from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.model.loader import load_pipeline

# admission lets every session in (target 1.0, long wait): the ramp, not the estimate, finds the limit (as the
# realtime bench does)
RAMP_SETTINGS = {"realtime_target": 1.0, "admission_wait_s": 30.0, "max_waiting": 64, "max_sessions": 32}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


def summary(rows: dict, steps: int, fps: int) -> dict:
    held = rows["holds"][-1]
    ttfc = held["joining_first_clip_s"]
    return {"sessions_held": held["sessions"] if held["stalls"] == 0 else 0, "held_for_s": round(held["hold_s"], 1),
            "stalls_in_hold": held["stalls"], "ramp_stop": rows["ramp_stop"], "steps": steps, "fps": fps,
            "joining_first_clip_p50_s": round(statistics.median(ttfc), 3) if ttfc else None,
            "joining_first_clip_p99_s": pct(ttfc, 99) if ttfc else None, "ramp": rows["ramp"],
            "holds": rows["holds"]}  # fmt: skip


def single_capacity(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.torch_threads)
    pipe = load_pipeline(args.model, device=args.device, precision=args.precision)
    steps = args.steps or pipe.config.default_steps
    config = EngineConfig(max_batch=16, **RAMP_SETTINGS)
    engine = Engine(pipe, config).start()
    try:
        rows = asyncio.run(ramp_and_hold(engine, pipe, steps, args.max_sessions, 1.0, args.hold_s, args.probes))
    finally:
        engine.stop()
    return summary(rows, steps, pipe.config.fps)


def _app_args(args: argparse.Namespace, replicas: int, tmp: str) -> dict:
    return {"replicas": replicas, "model": args.model, "device": args.device, "precision": args.precision,
            "torch_threads": args.torch_threads if args.device == "cpu" else None, "cpus_per_replica": 0.5,
            "data_dir": tmp, "max_batch": 16, **RAMP_SETTINGS}  # fmt: skip


def ray_capacity(args: argparse.Namespace, replicas: int) -> dict:
    from ray import serve

    from ca2vdm.server.cluster.app import build
    from ca2vdm.server.cluster.remote import ENGINE_DEPLOYMENT, RemoteEngine

    with tempfile.TemporaryDirectory() as tmp:
        serve.run(build(_app_args(args, replicas, tmp)), name="ca2vdm", route_prefix="/")

        async def run() -> dict:
            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, "ca2vdm")
            engine = await RemoteEngine(
                handle, max_waiting=RAMP_SETTINGS["max_waiting"], admission_wait_s=RAMP_SETTINGS["admission_wait_s"]
            ).connect()
            while len(_members(engine)) < replicas:
                await asyncio.sleep(0.2)
            spec = engine.pipe
            steps = args.steps or spec.config.default_steps
            rows = await ramp_and_hold(engine, spec, steps, args.max_sessions, 1.0, args.hold_s, args.probes)
            result = summary(rows, steps, spec.config.fps)
            if args.kill and replicas == max(args.counts) and replicas > 1:
                result["kill"] = await kill_one(engine, steps, max(replicas, rows["holds"][-1]["sessions"]))
            return result

        try:
            return asyncio.run(run())
        finally:
            serve.delete("ca2vdm")


async def _kill_viewer(engine, params, viewer: Viewer, record: dict, killed: asyncio.Event) -> None:
    """A resumable live viewer of a cluster. When its replica dies it resumes with its token (as the client does on
    a 1012 close); refused, it starts a new session (a new `Viewer` in `record["again"]`), retrying while busy."""
    handle = await engine.start_session(params, resumable=True)
    record["replica"] = handle.replica
    try:
        try:
            async for clip in handle:
                if clip.first_frame == 0 and params.image is not None:
                    continue
                viewer.arrive(time.monotonic(), clip.num_frames)
                record["frames"] = clip.end_frame
            return
        except SessionFailed:  # SessionMoved: the replica is gone
            record["moved_after_kill_s"] = time.monotonic() - record["killed_at"] if killed.is_set() else None
        try:
            handle = await engine.resume(handle.info.resume_token, record.get("frames", 1))
            record["resume"] = "taken over"
        except SessionFailed as exc:
            record["resume"] = exc.code
            record["resume_answered_after_kill_s"] = time.monotonic() - record["killed_at"]
            again = record["again"] = Viewer(joined=time.monotonic(), fps=viewer.fps)
            while True:
                try:
                    handle = await engine.start_session(params)
                    break
                except ServerBusy:
                    await asyncio.sleep(1.0)
            record["restarted_on"] = handle.replica
            viewer = again
        async for clip in handle:
            if clip.first_frame == 0 and params.image is not None:
                continue
            viewer.arrive(time.monotonic(), clip.num_frames)
            if "first_clip_after_kill_s" not in record:
                record["first_clip_after_kill_s"] = time.monotonic() - record["killed_at"]
    except SessionFailed as exc:
        record["failed"] = f"{exc.code}: {exc}"
    finally:
        handle.cancel()


async def kill_one(engine, steps: int, sessions: int, settle_s: float = 10.0, limit_s: float = 150.0,
                   check_s: float = 20.0) -> dict:  # fmt: skip
    """Part 2 of the module docstring, on a cluster already up."""
    spec = engine.pipe
    killed = asyncio.Event()
    viewers: list[Viewer] = []
    records: list[dict] = []
    tasks = []
    for i in range(sessions):
        v, r = Viewer(joined=time.monotonic(), fps=spec.config.fps), {}
        viewers.append(v)
        records.append(r)
        tasks.append(asyncio.create_task(_kill_viewer(engine, _params(spec, steps, 50_000 + i), v, r, killed)))
        await asyncio.sleep(0.5)
    settle_stalls = await _observe(viewers, settle_s)
    settle_stalls += sum(v.stalls for v in viewers)
    for v in viewers:
        v.reset()
    before = _members(engine)
    victim = records[0]["replica"]
    pid = (await engine.replica_call(victim, "ping", 10.0))["pid"]
    others = [v for v, r in zip(viewers, records, strict=True) if r["replica"] != victim]
    hit = [r for r in records if r["replica"] == victim]
    t0 = time.monotonic()
    for r in records:
        r["killed_at"] = t0
    os.kill(pid, signal.SIGKILL)
    killed.set()
    print(f"killed replica {victim} (pid {pid}) holding {len(hit)} of {sessions} sessions")
    starving: set[int] = set()
    back_s = None
    while time.monotonic() - t0 < limit_s:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        starving |= {id(v) for v in others if v.starving(now)}
        if back_s is None and set(_members(engine)) - set(before) and len(_members(engine)) >= len(before):
            back_s = now - t0
        if back_s is not None and all("first_clip_after_kill_s" in r for r in hit):
            break
    recovered_s = time.monotonic() - t0
    again = [r["again"] for r in hit if "again" in r]
    everyone = others + again
    for v in everyone:
        v.reset()
    check_starving = await _observe(everyone, check_s)
    check = {"sessions": len(everyone), "seconds": check_s, "stalls": sum(v.stalls for v in everyone) + check_starving}
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "sessions": sessions,
        "replica_stats_before": before,
        "settle_stalls": settle_stalls,
        "killed_replica_sessions": len(hit),
        "other_replica_sessions": len(others),
        "other_replica_stalls_until_recovered": sum(v.stalls for v in others) + len(starving),
        "other_replica_stall_s": round(sum(v.stall_s for v in others), 3),
        "victims": [
            {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in r.items()
                if k not in ("again", "killed_at", "frames")
            }
            for r in hit
        ],  # fmt: skip
        "replica_back_after_s": round(back_s, 2) if back_s is not None else None,
        "victims_streaming_again_after_s": round(recovered_s, 2)
        if all("first_clip_after_kill_s" in r for r in hit)
        else None,
        "held_again": check,
    }


def _members(engine) -> dict:
    from ca2vdm.server.cluster.membership import members

    return members(engine.deployment)


async def _requests(base: str, n: int) -> dict:
    """Latencies (s) of REST calls, of stream setup (start -> ready) and of clip intervals at pace max."""
    rest, setup, intervals = [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for _ in range(n):
            t = time.perf_counter()
            assert (await client.get("/v1/models")).status_code == 200
            rest.append(time.perf_counter() - t)
    ws_url = base.replace("http://", "ws://") + "/v1/stream"
    for i in range(max(5, n // 10)):
        async with connect(ws_url, max_size=None) as ws:
            t = time.perf_counter()
            await ws.send(json.dumps({"type": "start", "seed": i, "steps": 2, "num_frames": 1 + 8 * 12,
                                      "format": "jpeg", "pace": "max"}))  # fmt: skip
            last = None
            async for msg in ws:
                if isinstance(msg, bytes):
                    continue
                data = json.loads(msg)
                now = time.perf_counter()
                if data["type"] == "ready":
                    setup.append(now - t)
                elif data["type"] == "clip":
                    if last is not None and data["index"] > 1:
                        intervals.append(now - last)
                    last = now
                    with contextlib.suppress(ConnectionClosed):  # the server may have finished meanwhile
                        await ws.send(json.dumps({"type": "ack", "frames": data["first_frame"] + data["num_frames"]}))
                elif data["type"] in ("done", "error"):
                    break
    return {name: {"p50_ms": round(1e3 * statistics.median(v), 2), "p99_ms": round(1e3 * pct(v, 99), 2), "n": len(v)}
            for name, v in (("rest_get_models", rest), ("stream_start_to_ready", setup),
                            ("clip_interval_max_pace", intervals))}  # fmt: skip


def overhead(args: argparse.Namespace) -> dict:
    from ray import serve

    from ca2vdm.server.cluster.app import build

    torch.set_num_threads(args.torch_threads)
    pipe = load_pipeline(args.model, device=args.device, precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(pipe, data_dir=tmp, max_batch=16) as (address, _):
        single = asyncio.run(_requests(f"http://{address}", args.requests))
    with tempfile.TemporaryDirectory() as tmp:
        serve.run(build(_app_args(args, 1, tmp)), name="ca2vdm", route_prefix="/")
        try:
            via_ray = asyncio.run(_requests(f"http://127.0.0.1:{args.port}", args.requests))
        finally:
            serve.delete("ca2vdm")
    return {"single_server": single, "ray_serve": via_ray,
            "added_ms_p50": {k: round(via_ray[k]["p50_ms"] - single[k]["p50_ms"], 2) for k in single}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model spec (default: the packaged default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per engine (CPU)")
    ap.add_argument("--hold-s", type=float, default=30.0)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--max-sessions", type=int, default=24)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs Ray sees (default: replicas, logical on CPU)")
    ap.add_argument("--kill", action="store_true", help="kill a replica mid-stream at the largest replica count")
    ap.add_argument("--skip", default="", help="comma-separated: single, ray, overhead")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    counts = args.counts = [int(c) for c in args.replicas.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {
        "benchmark": "scaleout",
        "command": "python bench/scaleout.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if v not in (None, "", False) and k != "counts"
        ),  # fmt: skip
        "commit": git_commit(),
        "machine": {
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "card": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        },  # fmt: skip
    }

    def save() -> None:  # after each part: a run cut short keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    if "single" not in skip:
        result["single_server"] = single_capacity(args)
        save()
        print("single server:", {k: v for k, v in result["single_server"].items() if k not in ("ramp", "holds")})
    if "ray" not in skip or "overhead" not in skip:
        import ray
        from ray import serve

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
        gpus = args.gpus or max(counts)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        try:
            if "ray" not in skip:
                result["ray"] = {}
                for r in counts:
                    result["ray"][str(r)] = ray_capacity(args, r)
                    save()
                    print(f"ray, {r} replicas:", {k: v for k, v in result["ray"][str(r)].items()
                                                  if k not in ("ramp", "holds")})  # fmt: skip
                one = result["ray"].get("1", {}).get("sessions_held") or None
                result["scaling"] = {r: (v["sessions_held"] / one if one else None) for r, v in result["ray"].items()}
            if "overhead" not in skip:
                result["overhead"] = overhead(args)
                print("overhead:", json.dumps(result["overhead"], indent=1))
        finally:
            serve.shutdown()
            ray.shutdown()
    save()
    if args.out:
        print("wrote", args.out)


if __name__ == "__main__":
    main()
