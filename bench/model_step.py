"""First GPU numbers for the model core: one denoising forward of XL/2 against the dense cache.

Runs (one process, one card):
1. correctness on the card: the reference tiny model in fp32 against the golden vectors, and XL/2 (random
   weights) bf16 cached vs fp32 cached and vs the bf16 recompute pass before the first dequeue;
2. the card's ceilings: bf16 matmul rate (8192^3) and device-to-device copy bandwidth;
3. per AR step (10 steps, 1 session, 8-frame chunk, 25-frame cache): median time of a cached denoising
   forward, of the cache write, and of the recompute forward over [<=25 conditional | 8 noisy] frames
   (the baseline a model without the cache pays every denoising step), eager and torch.compile;
4. FLOPs of one cached denoising forward (torch's FLOP counter) and the implied compute floor.

Usage: python bench/model_step.py --out results.json   (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.server.benchmark.timing import git_commit  # noqa: E402
from ca2vdm.server.model.cache import DenseKVCache  # noqa: E402
from ca2vdm.server.model.config import ModelConfig, get_preset  # noqa: E402
from ca2vdm.server.model.stdit import CausalSTDiT  # noqa: E402


def cuda_time_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median of `iters` event-timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def card_ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = cuda_time_ms(lambda: a @ b, iters=10, warmup=3)
    src = torch.randn(1024 * 1024 * 1024 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src), iters=10, warmup=3)
    return {
        "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9,
        "copy_bandwidth_gbs": 2 * src.numel() * 2 / copy_ms / 1e6,  # bytes read + written
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_reference(reference_dir: Path) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = json.loads((reference_dir / "tiny_reference_config.json").read_text())
    model = CausalSTDiT(ModelConfig.from_reference_kwargs(ref["config"])).eval()
    model.load_state_dict(torch.load(reference_dir / "tiny_reference_state_dict.pt", weights_only=True))
    model = model.cuda()
    v = {k: t.cuda() for k, t in torch.load(reference_dir / "tiny_reference_vectors.pt", weights_only=True).items()}
    cache = DenseKVCache.for_model(model, 1, ref["kv_cache_max_seqlen"])
    model.write(cache, v["first_frame"])
    errs = []
    for k in range(6):
        errs.append(rel_err(model.denoise(cache, v[f"ar{k}_noisy"], v[f"ar{k}_t"]), v[f"ar{k}_out"]))
        model.write(cache, v[f"ar{k}_clean"])
    errs.append(rel_err(model(v["recompute_x"], v["recompute_t"], v["recompute_mask_channel"]), v["recompute_out"]))
    return {"max_rel_err_fp32_vs_reference": max(errs)}


def recompute_inputs(model, history, noisy, t):
    b, n = history.shape[0], history.shape[2]
    x = torch.cat([history, noisy], dim=2)
    tt = torch.cat([torch.zeros(b, n, device="cuda"), t[:, None].float().expand(b, noisy.shape[2])], dim=1)
    cond = torch.cat([torch.ones(b, n, device="cuda"), torch.zeros(b, noisy.shape[2], device="cuda")], dim=1)
    return x, tt, cond


def check_full_size(cfg, chunk: int, p_max: int, std_scale: float) -> dict:
    """XL/2 with random weights: bf16 vs fp32 (cached path), and cached vs recompute in fp32 (TF32 off)
    and in bf16, over 3 AR steps before the first dequeue (where the two paths are the same function)."""
    c, (h, w) = cfg.in_channels, cfg.input_size[1:]
    model32 = CausalSTDiT(cfg).randomize_(0, std_scale=std_scale).cuda().eval()
    model16 = CausalSTDiT(cfg).cuda().eval()
    model16.load_state_dict(model32.state_dict())
    model16 = model16.to(torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(0)
    first = torch.randn(1, c, 1, h, w, device="cuda", generator=gen)
    caches = {m: DenseKVCache.for_model(m, 1, p_max) for m in (model32, model16)}
    torch.backends.cuda.matmul.allow_tf32 = False
    for m, cch in caches.items():
        m.write(cch, first)
    history = first
    errs: dict[str, list[float]] = {
        "bf16_vs_fp32": [],
        "fp32_cached_vs_recompute": [],
        "bf16_cached_vs_recompute": [],
    }
    for _ in range(3):
        noisy = torch.randn(1, c, chunk, h, w, device="cuda", generator=gen)
        t = torch.tensor([600], device="cuda")
        out32 = model32.denoise(caches[model32], noisy, t)
        out16 = model16.denoise(caches[model16], noisy, t)
        n = history.shape[2]
        with torch.no_grad():
            re32 = model32(*recompute_inputs(model32, history, noisy, t))[:, :, n:]
            re16 = model16(*recompute_inputs(model16, history, noisy, t))[:, :, n:]
        errs["bf16_vs_fp32"].append(rel_err(out16, out32))
        errs["fp32_cached_vs_recompute"].append(rel_err(out32, re32))
        errs["bf16_cached_vs_recompute"].append(rel_err(out16, re16))
        clean = torch.randn(1, c, chunk, h, w, device="cuda", generator=gen)
        for m, cch in caches.items():
            m.write(cch, clean)
        history = torch.cat([history, clean], dim=2)
    torch.backends.cuda.matmul.allow_tf32 = True
    del model32, model16, caches
    torch.cuda.empty_cache()
    return {k: max(v) for k, v in errs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="XL/2")
    parser.add_argument("--ar-steps", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    parser.add_argument("--out", default="model_step.json")
    parser.add_argument("--commit", default=None, help="commit under test (default: git rev-parse HEAD)")
    parser.add_argument("--reference-dir", default=str(ROOT / "tests" / "data" / "reference"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"

    result: dict = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    result["commit"] = args.commit or git_commit()
    result.update(check_reference(Path(args.reference_dir)))
    torch.backends.cuda.matmul.allow_tf32 = True
    result.update(card_ceilings())

    pcfg = get_preset(args.preset)
    cfg = pcfg.model
    chunk, p_max = pcfg.chunk_frames, pcfg.max_cache_frames
    c, (h, w) = cfg.in_channels, cfg.input_size[1:]
    for std_scale in (1.0, 0.3):
        result[f"xl2_checks_std{std_scale}"] = check_full_size(cfg, chunk, p_max, std_scale)
    model = CausalSTDiT(cfg).randomize_(0).to(device="cuda", dtype=torch.bfloat16).eval()
    gen = torch.Generator("cuda").manual_seed(0)
    first = torch.randn(1, c, 1, h, w, device="cuda", generator=gen)

    # FLOPs of one cached denoising forward with a full cache
    cache = DenseKVCache.for_model(model, 1, p_max)
    model.write(cache, first)
    for _ in range(3):
        model.write(cache, torch.randn(1, c, chunk, h, w, device="cuda"))
    noisy = torch.randn(1, c, chunk, h, w, device="cuda")
    t = torch.tensor([500], device="cuda")
    with FlopCounterMode(display=False) as counter:
        model.denoise(cache, noisy, t)
    flops = counter.get_total_flops()
    result["denoise_tflop"] = flops / 1e12
    result["compute_floor_ms"] = flops / (result["bf16_matmul_tflops"] * 1e12) * 1e3

    # per-AR-step timing
    rows = []
    cache = DenseKVCache.for_model(model, 1, p_max)
    model.write(cache, first)
    history = first
    for step in range(args.ar_steps):
        noisy = torch.randn(1, c, chunk, h, w, device="cuda")
        t = torch.tensor([500], device="cuda")
        clean = torch.randn(1, c, chunk, h, w, device="cuda")
        window = history[:, :, -p_max:]
        x, tt, cond = recompute_inputs(model, window, noisy, t)
        start_pos = history.shape[2] - window.shape[2]
        row = {"ar_step": step, "cached_frames": int(cache.num_cached()[0])}
        row["denoise_ms"] = cuda_time_ms(lambda n=noisy, t=t: model.denoise(cache, n, t), args.iters)
        with torch.no_grad():
            row["recompute_ms"] = cuda_time_ms(lambda a=(x, tt, cond), s=start_pos: model(*a, tpe_start=s), args.iters)
        # time one write (it mutates the cache, so exactly once)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.write(cache, clean)
        end.record()
        end.synchronize()
        row["write_ms"] = start.elapsed_time(end)
        history = torch.cat([history, clean], dim=2)
        rows.append(row)
    result["ar_steps"] = rows

    if args.compile:  # steady state (full cache) under torch.compile; the warm-up includes compilation
        t0 = time.perf_counter()
        compiled = torch.compile(model.denoise)
        result["denoise_compile_ms"] = cuda_time_ms(lambda: compiled(cache, noisy, t), args.iters, warmup=3)
        result["compile_s"] = time.perf_counter() - t0

    # CUDA graph of one denoising forward (full cache): GPU time without Python launch overhead
    static_x, static_t = noisy.clone(), t.clone()
    model.denoise(cache, static_x, static_t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model.denoise(cache, static_x, static_t)
    result["denoise_cuda_graph_ms"] = cuda_time_ms(graph.replay, args.iters, warmup=3)
    assert torch.isfinite(static_out).all()

    # where the eager time goes: top CUDA kernels of one denoising forward
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.denoise(cache, noisy, t)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    Path(args.out).with_suffix(".profile.txt").write_text(table)

    full = [r["denoise_ms"] for r in rows if r["cached_frames"] == p_max]
    result["denoise_ms_full_cache_median"] = statistics.median(full) if full else None
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    print(
        f"card {result['card']}: matmul {result['bf16_matmul_tflops']:.0f} TFLOP/s, "
        f"copy {result['copy_bandwidth_gbs']:.0f} GB/s"
    )
    print(f"fp32 vs reference {result['max_rel_err_fp32_vs_reference']:.2e}")
    for std_scale in (1.0, 0.3):
        checks = result[f"xl2_checks_std{std_scale}"]
        print(f"XL/2 std {std_scale}: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    print(f"CUDA graph denoise (full cache): {result['denoise_cuda_graph_ms']:.2f} ms")
    print(f"denoise forward: {result['denoise_tflop']:.2f} TFLOP, floor {result['compute_floor_ms']:.2f} ms")
    if args.compile:
        print(f"torch.compile denoise (full cache): {result['denoise_compile_ms']:.2f} ms")
    print(f"{'step':>4} {'cached':>6} {'denoise ms':>10} {'write ms':>9} {'recompute ms':>12}")
    for r in rows:
        print(
            f"{r['ar_step']:>4} {r['cached_frames']:>6} {r['denoise_ms']:>10.2f} {r['write_ms']:>9.2f} "
            f"{r['recompute_ms']:>12.2f}"
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
