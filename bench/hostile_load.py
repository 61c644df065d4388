"""A good viewer's service under a mixed hostile load, against a real `ca2vdm serve` on loopback.

The server runs as its own process (the default model unless --model says otherwise). First a good client streams
alone: a live viewer (pace realtime, with the sprites sample image) and a max-pace stream, for time to first clip,
frames/s and stalls. Then a second process starts the hostile clients, all at once and for as long as the
measurement lasts, each from its own loopback address:
- non-readers (127.0.0.2): websockets that start a stream and never read or acknowledge, holding every slot they can;
- JSON floods (127.0.0.3): start messages of several MB that are not valid, and valid starts followed by 1 MB
  control messages, reconnecting after each refusal;
- deeply nested JSON (127.0.0.4), before and after start;
- image bombs (127.0.0.5): a 16-bit 6300x6300 PNG (103 KB), a 1x39,000,000 PNG, and a 4096x4096 PNG within limits;
- large bodies (127.0.0.6): POST /v1/videos declaring 1 GiB, and 1 GiB sent chunked;
- job floods (127.0.0.7): 1,000 submissions of small jobs;
- slowloris (127.0.0.8): 200 HTTP requests whose headers come a byte every 2 s.
After `--settle` seconds the good client streams again, while a sampler times /healthz every 100 ms and reads the
server's RSS. When the hostile process stops, the server must give back every page and file descriptor.

    python bench/hostile_load.py --out bench/results/hostile_load_cpu.json        # default model, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ca2vdm.client.stream import Clip, StreamClient

SAMPLE = Path(__file__).resolve().parents[1] / "server" / "api" / "static" / "samples" / "sprites.png"


@dataclass
class Config:
    model: str | None = None  # None: the packaged default model
    frames: int = 65  # per good stream: the image, then 8 clips (8 s of video at 8 fps)
    settle_s: float = 10.0  # hostile load before the good client measures again
    nonreaders: int = 16
    json_flood_connections: int = 2
    json_flood_bytes: int = 6 * 2**20
    jobs: int = 1000
    slowloris: int = 200
    nested: bool = True
    image_bombs: bool = True
    large_bodies: bool = True
    server_env: dict = field(default_factory=dict)


# ---- hostile payloads ----------------------------------------------------------------------------------------


def _png(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A valid PNG of one flat colour (tiny when compressed, whatever its size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[colour]
    row_bytes = width * channels * bit_depth // 8
    piece = b"\x40" * min(row_bytes, 2**20)
    comp = zlib.compressobj(9)
    parts = []
    for _ in range(height):  # each row: filter byte 0, then the row in pieces of at most 1 MB
        parts.append(comp.compress(b"\x00"))
        for start in range(0, row_bytes, len(piece)):
            parts.append(comp.compress(piece[: min(len(piece), row_bytes - start)]))
    data = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _bombs() -> list[str]:
    return [base64.b64encode(p).decode() for p in (_png(6300, 6300, 16, 0), _png(39_000_000, 1), _png(4096, 4096))]


# ---- hostile clients (a process of their own) ----------------------------------------------------------------


def _bound(source: str, host: str, port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


async def _nonreader(host: str, port: int, stop: asyncio.Event, counts: dict) -> None:
    while not stop.is_set():
        try:
            sock = _bound("127.0.0.2", host, port, rcvbuf=4096)
            async with connect(f"ws://{host}:{port}/v1/stream", sock=sock, max_queue=1) as ws:
                await ws.send(json.dumps({"type": "start", "format": "jpeg"}))
                counts["nonreader_started"] += 1
                await stop.wait()  # hold the slot, read nothing
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            counts["nonreader_dropped"] += 1
            await asyncio.sleep(0.5)


async def _json_flood(host: str, port: int, size: int, stop: asyncio.Event, counts: dict) -> None:
    big_start = '{"type": "start", "colour": "' + "x" * size + '"}'
    control = '{"type": "ack", "frames": "' + "y" * 2**20 + '"}'
    while not stop.is_set():
        try:
            sock = _bound("127.0.0.3", host, port)
            async with connect(f"ws://{host}:{port}/v1/stream", sock=sock, max_size=2**24) as ws:
                if counts["json_flood"] % 2:
                    await ws.send(big_start)
                else:
                    await ws.send(json.dumps({"type": "start", "format": "jpeg", "num_frames": 9}))
                    await ws.send(control)
                counts["json_flood"] += 1
                async for _ in ws:
                    pass
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            counts["refused"] += 1
        await asyncio.sleep(0.02)  # an attacker's reconnect loop (a refused connect returns at once)


async def _nested(host: str, port: int, stop: asyncio.Event, counts: dict) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    while not stop.is_set():
        try:
            sock = _bound("127.0.0.4", host, port)
            async with connect(f"ws://{host}:{port}/v1/stream", sock=sock) as ws:
                if counts["nested"] % 2:
                    await ws.send(deep)
                else:
                    await ws.send(json.dumps({"type": "start", "format": "jpeg", "num_frames": 9}))
                    await ws.send('{"type": "stop", "x": ' + "[" * 2000 + "]" * 2000 + "}")
                counts["nested"] += 1
                async for _ in ws:
                    pass
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            counts["refused"] += 1
        await asyncio.sleep(0.05)


async def _image_bombs(host: str, port: int, stop: asyncio.Event, counts: dict) -> None:
    bombs = _bombs()
    i = 0
    while not stop.is_set():
        try:
            sock = _bound("127.0.0.5", host, port)
            async with connect(f"ws://{host}:{port}/v1/stream", sock=sock, max_size=2**24) as ws:
                await ws.send(json.dumps({"type": "start", "image": bombs[i % len(bombs)], "format": "jpeg",
                                          "num_frames": 1}))  # fmt: skip
                i += 1
                counts["image_bombs"] += 1
                async for _ in ws:
                    pass
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            counts["refused"] += 1
        await asyncio.sleep(0.1)


async def _large_bodies(host: str, port: int, stop: asyncio.Event, counts: dict) -> None:
    async def gigabyte():
        chunk = b"\x00" * 2**20
        for _ in range(1024):
            yield chunk

    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.6")
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                headers = {"content-type": "application/json", "content-length": str(2**30)}
                await client.post(f"http://{host}:{port}/v1/videos", content=b"{}", headers=headers)
                counts["large_bodies"] += 1
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"http://{host}:{port}/v1/videos", content=gigabyte(),
                                  headers={"content-type": "application/json"})  # fmt: skip
                counts["large_bodies"] += 1
            await asyncio.sleep(0.2)


async def _jobs(host: str, port: int, n: int, counts: dict) -> None:
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.7")
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        for _ in range(0, n, 50):
            replies = await asyncio.gather(*(client.post(f"http://{host}:{port}/v1/videos",
                                                         json={"num_frames": 9, "steps": 2}) for _ in range(50)),
                                           return_exceptions=True)  # fmt: skip
            for r in replies:
                key = f"jobs_{r.status_code}" if isinstance(r, httpx.Response) else "jobs_error"
                counts[key] = counts.get(key, 0) + 1


async def _slowloris(host: str, port: int, n: int, stop: asyncio.Event, counts: dict) -> None:
    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.8", 0))
        except OSError:
            return
        start = time.monotonic()
        try:
            writer.write(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                writer.write(b"X")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 2.0) == b"":
                        break  # closed by the server
                except TimeoutError:
                    continue  # still held open
        except OSError:
            pass
        counts.setdefault("slowloris_held_s", []).append(time.monotonic() - start)
        writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


def _hostile_process(host: str, port: int, config: Config, stop_flag, counts_out) -> None:
    os.nice(19)  # the attackers share this machine's two cores: at the lowest priority they stand in for remote ones

    async def main() -> None:
        stop = asyncio.Event()
        counts: dict = {"nonreader_started": 0, "nonreader_dropped": 0, "json_flood": 0, "nested": 0,
                        "image_bombs": 0, "large_bodies": 0, "refused": 0}  # fmt: skip

        async def watch() -> None:
            while not stop_flag.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        tasks = [asyncio.create_task(watch())]
        tasks += [asyncio.create_task(_nonreader(host, port, stop, counts)) for _ in range(config.nonreaders)]
        tasks += [asyncio.create_task(_json_flood(host, port, config.json_flood_bytes, stop, counts))
                  for _ in range(config.json_flood_connections)]  # fmt: skip
        chosen = [(config.nested, _nested), (config.image_bombs, _image_bombs), (config.large_bodies, _large_bodies)]
        tasks += [asyncio.create_task(f(host, port, stop, counts)) for on, f in chosen if on]
        tasks.append(asyncio.create_task(_jobs(host, port, config.jobs, counts)))
        tasks.append(asyncio.create_task(_slowloris(host, port, config.slowloris, stop, counts)))
        await asyncio.gather(*tasks, return_exceptions=True)
        held = counts.pop("slowloris_held_s", [])
        counts["slowloris_max_held_s"] = max(held) if held else None
        counts_out.update(counts)

    asyncio.run(main())


# ---- the good client and the server's vital signs ---------------------------------------------------------------


async def good_stream(url: str, frames: int, pace: str, seed: int) -> dict:
    client = StreamClient(url)
    start = time.perf_counter()
    clips: list[tuple[float, int, float | None]] = []
    async with contextlib.aclosing(client.stream(image=SAMPLE, seed=seed, num_frames=frames, pace=pace)) as events:
        async for event in events:
            if isinstance(event, Clip) and event.first_frame > 0:  # clip 0 is the image
                clips.append((time.perf_counter() - start, event.num_frames, event.ahead_ms))
    first = clips[0][0]
    fps = sum(n for _, n, _ in clips[1:]) / (clips[-1][0] - first) if len(clips) > 1 else float("nan")
    aheads = [a for _, _, a in clips if a is not None]
    return {"pace": pace, "first_clip_s": first, "frames_per_s": fps, "clips": len(clips),
            "stalls": sum(a < 0 for a in aheads), "min_ahead_ms": min(aheads) if aheads else None}  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def vital_signs(url: str, pid: int, stop: asyncio.Event) -> dict:
    healthz, rss = [], []
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            t = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                await client.get(f"{url}/healthz")
                healthz.append((time.perf_counter() - t) * 1e3)
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.1)
    return {"healthz_ms_p50": statistics.median(healthz), "healthz_ms_p99": float(np.percentile(healthz, 99)),
            "healthz_ms_max": max(healthz), "healthz_samples": len(healthz), "rss_mb_max": max(rss)}  # fmt: skip


async def measure(url: str, pid: int, frames: int) -> dict:
    stop = asyncio.Event()
    signs = asyncio.create_task(vital_signs(url, pid, stop))
    live = await good_stream(url, frames, "realtime", seed=1)
    fast = await good_stream(url, frames, "max", seed=2)
    stop.set()
    return {"realtime": live, "max": fast, **await signs}


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ca2vdm_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["ca2vdm_sessions_active"] == 0 and m["ca2vdm_sessions_waiting"] == 0
        if idle and m["ca2vdm_cache_pages_free"] == m["ca2vdm_cache_pages_total"]:
            return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not idle: {m}")
        time.sleep(0.5)


def start_server(config: Config, data_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CA2VDM_DATA_DIR": data_dir, "CA2VDM_PORT": str(port), "CA2VDM_DEVICE": "cpu",
           **config.server_env}  # fmt: skip
    cmd = [sys.executable, "-m", "ca2vdm.server.cli", "serve"] + (["--model", config.model] if config.model else [])
    log = open(Path(data_dir) / "server.log", "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(Path(data_dir) / 'server.log').read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready")
        time.sleep(0.2)


def run(config: Config) -> dict:
    data_dir = tempfile.mkdtemp(prefix="ca2vdm-hostile-")
    proc, url = start_server(config, data_dir)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    try:
        fds_before, rss_before = open_fds(proc.pid), rss_mb(proc.pid)
        unloaded = asyncio.run(measure(url, proc.pid, config.frames))
        ctx = mp.get_context("spawn")
        stop_flag, counts = ctx.Event(), ctx.Manager().dict()
        hostile = ctx.Process(target=_hostile_process, args=(host, port, config, stop_flag, counts), daemon=True)
        hostile.start()
        time.sleep(config.settle_s)
        mid = metrics(url)
        loaded = asyncio.run(measure(url, proc.pid, config.frames))
        stop_flag.set()
        hostile.join(timeout=120)
        if hostile.is_alive():
            hostile.kill()
        after = wait_idle(url)
        time.sleep(6.0)  # keep-alive and slowloris sockets close within their timeouts
        fds_after = open_fds(proc.pid)
        return {
            "config": {k: v for k, v in asdict(config).items() if k != "server_env"},
            "unloaded": unloaded,
            "loaded": loaded,
            "hostile_counts": dict(counts),
            "server_during_load": {k: v for k, v in mid.items() if "sessions" in k or "pages" in k},
            "after": {
                "fds_before": fds_before,
                "fds_after": fds_after,
                "rss_mb_before": rss_before,
                "rss_mb_after": rss_mb(proc.pid),
                "pages_free": after["ca2vdm_cache_pages_free"],
                "pages_total": after["ca2vdm_cache_pages_total"],
            },  # fmt: skip
            "ratios": {
                "first_clip_realtime": loaded["realtime"]["first_clip_s"] / unloaded["realtime"]["first_clip_s"],
                "frames_per_s_max": loaded["max"]["frames_per_s"] / unloaded["max"]["frames_per_s"],
            },
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"server log: {data_dir}/server.log", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=Config.frames)
    ap.add_argument("--settle", type=float, default=Config.settle_s)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run(Config(model=args.model, frames=args.frames, settle_s=args.settle))
    u, lo = result["unloaded"], result["loaded"]
    for pace in ("realtime", "max"):
        print(f"{pace:>8}: first clip {u[pace]['first_clip_s']:.2f} -> {lo[pace]['first_clip_s']:.2f} s, "
              f"{u[pace]['frames_per_s']:.1f} -> {lo[pace]['frames_per_s']:.1f} frames/s, "
              f"stalls {u[pace]['stalls']} -> {lo[pace]['stalls']}")  # fmt: skip
    print(f"healthz p99 {lo['healthz_ms_p99']:.1f} ms (max {lo['healthz_ms_max']:.1f}), "
          f"RSS max {lo['rss_mb_max']:.0f} MB")  # fmt: skip
    print("after:", result["after"])
    print("hostile:", result["hostile_counts"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
