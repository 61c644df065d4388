"""Timers and the card's ceilings, for `ca2vdm bench` and the scripts in bench/."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], iters: int = 10, warmup: int = 2) -> float:
    """Median wall time of `iters` calls of `fn` in ms, the device synchronised around each (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    cuda_sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        cuda_sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_tflops() -> float:
    """The bf16 rate of an 8192^3 product on this card (NaN without one): the compute floor's denominator."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed_ms(lambda: a @ a, iters=10, warmup=3)
    return 2 * 8192**3 / ms / 1e9


def fp8_matmul_tflops() -> float:
    """The float8 (e4m3, row-wise scales) rate of an 8192^3 product, as the float8 linears run it."""
    fp8 = torch.float8_e4m3fn
    a, b = (torch.randn(8192, 8192, device="cuda").to(fp8) for _ in range(2))
    sa, sb = torch.ones(8192, 1, device="cuda"), torch.ones(1, 8192, device="cuda")
    ms = timed_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                           use_fast_accum=True), iters=10, warmup=3)  # fmt: skip
    return 2 * 8192**3 / ms / 1e9


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the checkout the code runs from (result files name it), or "unknown"."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=cwd, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
