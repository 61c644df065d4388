"""Where a training step's time goes: per-step wall time (eager, optionally torch.compile) and the top kernels.

    python bench/profile_train.py --preset small --batch-size 128 --workers 14 [--compile] --out train_profile.json

Runs on the procedural sprites with the trainer of `ca2vdm train`; writes per-step times and the profiler's
table (CUDA time when on a GPU) as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from ca2vdm.server.model.config import get_preset
from ca2vdm.server.train.sprites import SpritesConfig, SpritesDataset
from ca2vdm.server.train.trainer import TrainConfig, Trainer


def timed_steps(trainer: Trainer, n: int) -> float:
    """Run n more steps; seconds per step (synchronised)."""
    trainer.cfg = replace(trainer.cfg, steps=trainer.step + n)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    ap.add_argument("--out", default="train_profile.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = get_preset(args.preset)
    h, w = pipe.model.input_size[1:]
    data = SpritesDataset(SpritesConfig(height=h, width=w, num_frames=pipe.model.max_tpe_len), length=10**6)
    result: dict = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(steps=1, batch_size=args.batch_size, num_workers=args.workers, log_every=10**6,
                          ckpt_every=10**6)  # fmt: skip
        trainer = Trainer(pipe, cfg, data, tmp, device=device)
        timed_steps(trainer, args.warmup)
        result["eager_ms_per_step"] = 1e3 * timed_steps(trainer, args.steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed_steps(trainer, 5)
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        result["profile_table"] = table
        print(f"eager: {result['eager_ms_per_step']:.1f} ms/step")
        print(table)
        _write(args.out, result)  # kept if the compiled run does not finish
        if args.compile:
            trainer.forward = torch.compile(trainer.model, dynamic=False)  # as `ca2vdm train --compile`
            start = time.perf_counter()
            timed_steps(trainer, args.warmup)  # every prefix length compiles once
            result["compile_warmup_s"] = time.perf_counter() - start
            result["compiled_ms_per_step"] = 1e3 * timed_steps(trainer, args.steps)
            ms, warm = result["compiled_ms_per_step"], result["compile_warmup_s"]
            print(f"compiled: {ms:.1f} ms/step (warm-up {warm:.0f} s)")
    _write(args.out, result)


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
