"""Where the time to a session's first generated clip goes, on a started engine (random XL/2 + SD-VAE).

Runs single sessions one after another (an image, 25 DDIM steps or each of `--steps`, 2 chunks) and, for each, the
time from
`start_session` to clip 1 together with the GPU-synchronised time of every runner phase inside it (prefill,
the denoising steps, the decode). Each phase is wrapped so that it synchronises the GPU when it ends; the
sum of the phases against the wall time shows what the engine loop and the delivery add.

Usage: python bench/first_clip.py --out first_clip.json [--precision bf16|fp8] [--sessions 4] [--steps 25,4]
       [--commit SHA]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.server.benchmark.timing import git_commit  # noqa: E402
from ca2vdm.server.engine.config import EngineConfig  # noqa: E402
from ca2vdm.server.engine.engine import Engine  # noqa: E402
from ca2vdm.server.engine.session import SessionParams  # noqa: E402
from ca2vdm.server.model.loader import load_pipeline  # noqa: E402


def timed(log: list, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        log.append((name, start, time.perf_counter()))
        return out

    return wrapper


async def one_session(engine: Engine, image: torch.Tensor, seed: int, steps: int) -> dict:
    start = time.perf_counter()
    params = SessionParams(image=image, seed=seed, sampler="ddim", steps=steps, num_frames=17)
    handle = await engine.start_session(params)
    arrivals = []
    async for _clip in handle:
        arrivals.append(time.perf_counter())
    return {"start": start, "clip0": arrivals[0], "clip1": arrivals[1], "end": arrivals[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="first_clip.json")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--steps", default="25", help="DDIM steps per chunk, comma-separated: each gets --sessions")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    pipe = load_pipeline("random:XL/2", device="cuda", precision=args.precision)
    engine = Engine(pipe, EngineConfig(max_sessions=1, max_batch=1)).start()
    log: list = []
    runner = engine.runner
    for name in ("prefill", "denoise", "decode_chunks", "continue_chunks"):
        setattr(runner, name, timed(log, name, getattr(runner, name)))
    image = torch.randint(0, 256, (*pipe.frame_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    try:
        for i, steps in ((i, int(s)) for s in args.steps.split(",") for i in range(args.sessions)):
            log.clear()
            r = asyncio.run(one_session(engine, image, seed=i, steps=steps))
            phases: dict[str, float] = {}
            for name, a, b in log:
                if a >= r["start"] and b <= r["clip1"]:
                    phases[name] = phases.get(name, 0.0) + (b - a) * 1e3
            rows.append({
                "session": i,
                "steps": steps,
                "time_to_first_generated_clip_ms": (r["clip1"] - r["start"]) * 1e3,
                "time_to_clip0_ms": (r["clip0"] - r["start"]) * 1e3,
                "phases_ms_until_clip1": phases,
                "denoise_steps_until_clip1": sum(1 for n, a, b in log if n == "denoise" and b <= r["clip1"]),
                "unaccounted_ms": (r["clip1"] - r["start"]) * 1e3 - sum(phases.values()),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": args.precision,
              "commit": args.commit or git_commit(), "command": "python3 " + " ".join(sys.argv),
              "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
