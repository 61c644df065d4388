"""The SD-VAE decode of finished chunks (random weights, 256x256, bf16) before and after compiling the decoder.

In one process, on one card: the decode of 1 and 5 chunks (8 and 40 frames) eagerly (the baseline), eagerly with
cuDNN's algorithm search, and with the decoder compiled by torch.compile (its compile time too); the decoder's
FLOPs per frame (the floor at the card's measured bf16 matmul rate); the compiled output against the eager one; the
CUDA time of one eager 8-frame decode by kernel (top 12).

Usage: python bench/vae_decode.py --out vae_decode.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.server.benchmark.timing import git_commit, matmul_tflops, timed_ms  # noqa: E402
from ca2vdm.server.model.codecs import SDVAECodec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="vae_decode.json")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    tflops = matmul_tflops()
    codec = SDVAECodec.random().to("cuda", torch.bfloat16)
    z = {n: torch.randn(n // 8, 4, 8, 32, 32, device="cuda") for n in (8, 40)}
    with FlopCounterMode(display=False) as counter:
        codec.decode(z[8][:, :, :1])
    gflop_per_frame = counter.get_total_flops() / 1e9
    result: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "commit": args.commit or git_commit(), "command": " ".join(sys.argv),
                    "bf16_matmul_tflops": tflops, "gflop_per_frame": gflop_per_frame, "variants": {}}  # fmt: skip

    def measure(name: str) -> dict:
        row = {f"decode_{n}_frames_ms": timed_ms(lambda n=n: codec.decode(z[n]), iters=10) for n in z}
        for n in z:
            row[f"decode_{n}_frames_floor_ratio"] = row[f"decode_{n}_frames_ms"] / (n * gflop_per_frame / tflops)
        result["variants"][name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
        return row

    eager_out = codec.decode(z[8])
    measure("eager")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        codec.decode(z[8])
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.device_time_total / 1e3
    result["eager_8_frames_cuda_ms_top"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    result["eager_8_frames_cuda_ms_total"] = sum(kernels.values())
    torch.backends.cudnn.benchmark = True
    measure("eager_cudnn_benchmark")
    torch.backends.cudnn.benchmark = False
    start = time.perf_counter()
    codec.compile_decoder()
    for n in z:
        codec.decode(z[n])
    torch.cuda.synchronize()
    result["compile_s"] = time.perf_counter() - start
    compiled_out = codec.decode(z[8])
    result["compiled_vs_eager_max_abs_diff"] = (compiled_out - eager_out).abs().max().item()
    result["compiled_vs_eager_mean_abs_diff"] = (compiled_out - eager_out).abs().mean().item()
    measure("compiled")
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
