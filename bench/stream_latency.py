"""Streaming speed as a viewer sees it: time to the first generated clip and frames/s after it, over the real
websocket of a running server (`ca2vdm serve`), with the server's default sampler settings.

    ca2vdm serve --model MODEL &            # CPU or GPU
    python bench/stream_latency.py --url http://127.0.0.1:8000 --frames 81 --sessions 1 --out stream.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

from ca2vdm.client.stream import Clip, Done, Ready, StreamClient


async def one_session(client: StreamClient, frames: int, image: str | None, seed: int) -> dict:
    start = time.perf_counter()
    clips: list[tuple[float, int]] = []  # (arrival s, frames) of generated clips
    async with contextlib.aclosing(client.stream(image=image, seed=seed, num_frames=frames)) as events:
        async for event in events:
            # with an image, clip 0 is that image; without one, frame 0 is generated too
            if isinstance(event, Clip) and (image is None or event.first_frame > 0):
                clips.append((time.perf_counter() - start, event.num_frames))
            elif isinstance(event, (Ready, Done)):
                continue
    first = clips[0][0]
    after = sum(n for _, n in clips[1:])
    fps = after / (clips[-1][0] - first) if len(clips) > 1 else float("nan")
    return {"first_clip_s": first, "frames_per_s_after_first": fps, "clips": len(clips)}


async def run(args: argparse.Namespace) -> dict:
    client = StreamClient(args.url, api_key=args.api_key)
    rows = await asyncio.gather(*(one_session(client, args.frames, args.image, i) for i in range(args.sessions)))
    return {
        "url": args.url,
        "sessions": args.sessions,
        "frames": args.frames,
        "first_clip_s_p50": statistics.median(r["first_clip_s"] for r in rows),
        "frames_per_s_per_session_p50": statistics.median(r["frames_per_s_after_first"] for r in rows),
        "per_session": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--image", default=None, help="condition image (default: none, the <BOV> frame)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(f"{args.sessions} session(s): first clip p50 {result['first_clip_s_p50']:.2f} s, "
          f"{result['frames_per_s_per_session_p50']:.1f} frames/s per session after it")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
