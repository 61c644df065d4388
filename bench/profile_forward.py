"""Where the time of one XL/2 denoising forward on the paged pool goes (for the speed work of the engine).

For 1 and 16 sessions (25 cached frames, 8-frame chunk, bf16): eager time, CUDA-graph time, torch.compile
time (if it compiles), and the top CUDA kernels of one eager forward grouped by kind. Writes JSON plus the
profiler tables.

Usage: python bench/profile_forward.py --out profile_forward.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.server.benchmark.timing import git_commit, timed_ms  # noqa: E402
from ca2vdm.server.cache.block_manager import PageManager  # noqa: E402
from ca2vdm.server.cache.paged import PagedKVCache  # noqa: E402
from ca2vdm.server.cache.pool import KVPool  # noqa: E402
from ca2vdm.server.engine.graphs import GraphedDenoiser  # noqa: E402
from ca2vdm.server.model.config import get_preset  # noqa: E402
from ca2vdm.server.model.stdit import CausalSTDiT  # noqa: E402

KINDS = [
    ("fp8 quantize", "_quantize_rows"),
    ("triton temporal attention", "_paged_temporal"),
    ("triton fused adaLN", "_modulated_norm"),
    ("triton fused adaLN", "_gated_add"),
    ("attention (SDPA: spatial, prefix)", "attention"),
    ("attention (SDPA: spatial, prefix)", "fmha"),
    ("attention (SDPA: spatial, prefix)", "flash"),
    ("GEMM", "gemm"),
    ("GEMM", "nvjet"),
    ("GEMM", "cutlass"),
    ("layer norm", "layer_norm"),
    ("index/gather", "index"),
    ("copy/cat", "copy"),
    ("copy/cat", "cat"),
    ("elementwise", "elementwise"),
    ("elementwise", "vectorized"),
    ("reduce", "reduce"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, key in KINDS if key in low), "other")


def cuda_ms_by_kind(prof) -> dict[str, float]:
    """CUDA time of a profile's kernels summed by kind, largest first."""
    by_kind: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and us:
            by_kind[kind_of(evt.key)] = by_kind.get(kind_of(evt.key), 0.0) + us / 1e3
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile_forward.json")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    cfg = get_preset("XL/2")
    mc = cfg.model
    model = CausalSTDiT(mc).randomize_(0, std_scale=0.3).to("cuda", torch.bfloat16).eval()
    result: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    result.update(commit=args.commit or git_commit(), command="python3 " + " ".join(sys.argv))
    for sessions in (1, 16):
        pool = KVPool.for_sessions(mc, sessions, cfg.max_cache_frames, "cuda", torch.bfloat16)
        pages = PageManager(pool.num_pages, pool.num_prefix_pages, mc.prefix_frames, cfg.max_cache_frames)
        streams = [pages.new_stream() for _ in range(sessions)]
        cache = PagedKVCache(pool, pages, streams)
        model.write(cache, torch.randn(sessions, 4, 1, 32, 32, device="cuda"))
        for _ in range(3):
            model.write(cache, torch.randn(sessions, 4, 8, 32, 32, device="cuda"))
        x = torch.randn(sessions, 4, 8, 32, 32, device="cuda")
        t = torch.full((sessions,), 500, device="cuda")
        row: dict = {"sessions": sessions, "eager_ms": timed_ms(lambda c=cache, x=x, t=t: model.denoise(c, x, t))}
        graphed = GraphedDenoiser(model, pool, pages, tuple(x.shape[1:]), sessions)
        row["graph_ms"] = timed_ms(lambda g=graphed, st=streams, x=x, t=t: g(st, x, t))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.denoise(cache, x, t)
            torch.cuda.synchronize()
        row["cuda_ms_by_kind"] = cuda_ms_by_kind(prof)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        Path(args.out).with_suffix(f".b{sessions}.txt").write_text(table)
        try:
            start = time.perf_counter()
            compiled = torch.compile(model.denoise)
            row["compile_ms"] = timed_ms(lambda f=compiled, c=cache, x=x, t=t: f(c, x, t), warmup=3)
            row["compile_seconds"] = time.perf_counter() - start
        except Exception as exc:  # record why, keep the other numbers
            row["compile_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        result["rows"].append(row)
        print(json.dumps(row, indent=1))
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
