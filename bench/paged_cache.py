"""Paged K/V pool benchmark at XL/2 shapes (S=256 tokens, 16 heads, head_dim 72, bf16), one card.

1. correctness at XL/2 shapes: each kernel vs its torch reference (bf16, fp16, fp32);
   the model over the paged pool vs the dense cache (XL/2 random weights, fp32 and bf16);
2. the card's copy bandwidth (device-to-device, bytes read + written);
3. paged temporal attention, 25 cached frames, 8-frame chunk, 1/4/16/64 sessions:
   ours vs SDPA on a contiguous cache (no gather) vs gather-then-SDPA; bandwidth over the K/V bytes read;
4. prefix-enhanced attention (3 prefix frames, 2048 noisy queries): paged Triton vs gather+SDPA vs contiguous SDPA;
5. per-AR-step cache maintenance for all 28 layers: paged write of 8 frames vs the reference's
   torch.roll of its dense (depth, B, 25, S, 2C) cache plus the write;
6. capacity: 25-frame XL/2 sessions that fit next to the model in the card's free memory;
7. one XL/2 denoising forward (eager) on the paged pool vs the dense cache, 1/4/16 sessions.

Usage: python bench/paged_cache.py --out paged_cache.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.kernels.paged_prefix_attention import (  # noqa: E402
    gather_prefix_kv,
    paged_prefix_attention,
    paged_prefix_attention_reference,
    paged_prefix_attention_sdpa,
)
from ca2vdm.kernels.paged_temporal_attention import (  # noqa: E402
    paged_temporal_attention,
    paged_temporal_attention_reference,
)
from ca2vdm.kernels.paged_write import paged_write  # noqa: E402
from ca2vdm.server.benchmark.timing import git_commit  # noqa: E402
from ca2vdm.server.cache.block_manager import PageManager  # noqa: E402
from ca2vdm.server.cache.paged import PagedKVCache  # noqa: E402
from ca2vdm.server.cache.pool import KVPool  # noqa: E402
from ca2vdm.server.model.cache import DenseKVCache  # noqa: E402
from ca2vdm.server.model.config import get_preset  # noqa: E402
from ca2vdm.server.model.layers import chunk_causal_mask  # noqa: E402
from ca2vdm.server.model.stdit import CausalSTDiT  # noqa: E402

S, H, D, T, P_MAX, DEPTH = 256, 16, 72, 8, 25, 28
BF16 = torch.bfloat16


def timed(fns, iters: int = 20, warmup: int = 3) -> float:
    """Median ms per call, cycling through `fns` (distinct input sets, so repeated calls miss the L2)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def copy_bandwidth() -> float:
    src = torch.randn(512 * 1024 * 1024, device="cuda", dtype=BF16)
    dst = torch.empty_like(src)
    ms = timed([lambda: dst.copy_(src)], iters=10)
    return 2 * src.nbytes / ms / 1e6  # GB/s


def kernel_correctness() -> dict:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in (BF16, torch.float16, torch.float32):
        num_pages = 120
        pool = torch.randn(num_pages, 2, S, H, D, generator=gen).to("cuda", dtype)
        q, k, v = torch.randn(4, S, T, 3, H, D, generator=gen).to("cuda", dtype).unbind(3)
        table = torch.stack([torch.randperm(num_pages, generator=gen)[:P_MAX] for _ in range(4)]).int().cuda()
        lens = torch.tensor([0, 1, 13, 25], dtype=torch.int32, device="cuda")
        a = paged_temporal_attention(q, k, v, pool, table, lens)
        b = paged_temporal_attention_reference(q, k, v, pool, table, lens)
        qp = torch.randn(4, T * S, H, D, generator=gen).to("cuda", dtype)
        prefix = table[:, :3].contiguous()
        c = paged_prefix_attention(qp, pool, prefix)
        d = paged_prefix_attention_reference(qp, pool, prefix)
        out[str(dtype).split(".")[-1]] = {"temporal_rel_err": rel_err(a, b), "prefix_rel_err": rel_err(c, d)}
    return out


def model_correctness(cfg) -> dict:
    """XL/2 random weights: a batch of 3 streams (1, 9, 25 cached frames) on the paged pool vs each alone on
    the dense cache, fp32 (TF32 off) and bf16."""
    out = {}
    for dtype in (torch.float32, BF16):
        torch.backends.cuda.matmul.allow_tf32 = False
        model = CausalSTDiT(cfg).randomize_(0, std_scale=0.3).to("cuda", dtype).eval()
        pool = KVPool.for_sessions(cfg, 3, P_MAX, "cuda", dtype)
        mgr = PageManager(pool.num_pages, pool.num_prefix_pages, cfg.prefix_frames, P_MAX)
        gen = torch.Generator("cuda").manual_seed(0)
        streams, dense = [], []
        for num_chunks in (0, 1, 4):
            st, dc = mgr.new_stream(), DenseKVCache.for_model(model, 1, P_MAX)
            for w in range(num_chunks + 1):
                x = torch.randn(1, 4, 1 if w == 0 else T, 32, 32, device="cuda", generator=gen)
                model.write(PagedKVCache(pool, mgr, [st]), x)
                model.write(dc, x)
            streams.append(st)
            dense.append(dc)
        x = torch.randn(3, 4, T, 32, 32, device="cuda", generator=gen)
        t = torch.tensor([10, 500, 990], device="cuda")
        paged = model.denoise(PagedKVCache(pool, mgr, streams), x, t)
        errs = [rel_err(paged[i : i + 1], model.denoise(dense[i], x[i : i + 1], t[i : i + 1])) for i in range(3)]
        out[str(dtype).split(".")[-1]] = max(errs)
        del model, pool, dense
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def temporal_attention_bench(sessions: int, copy_gbs: float) -> dict:
    num_pages = max(sessions * P_MAX * 2, 400)  # a pool larger than the working set; random pages
    pool = torch.randn(num_pages, 2, S, H, D, device="cuda", dtype=BF16)
    sets = 4
    tables = [
        torch.stack([torch.randperm(num_pages, device="cuda")[:P_MAX] for _ in range(sessions)]).int()
        for _ in range(sets)
    ]
    lens = torch.full((sessions,), P_MAX, dtype=torch.int32, device="cuda")
    q, k, v = torch.randn(sessions, S, T, 3, H, D, device="cuda", dtype=BF16).unbind(3)
    sweep = {
        w: timed([lambda tb=tb, w=w: paged_temporal_attention(q, k, v, pool, tb, lens, num_warps=w) for tb in tables])
        for w in (1, 2)
    }
    best_warps = min(sweep, key=sweep.get)
    ours = sweep[best_warps]
    cache_bytes = sessions * P_MAX * 2 * S * H * D * 2
    io_bytes = cache_bytes + 4 * q.numel() * 2  # + q, k_new, v_new read, out written

    # baseline: the same math on a contiguous cache (no gather), torch SDPA with the chunk-causal mask
    mask = chunk_causal_mask(P_MAX, T, torch.device("cuda"))
    n_buf = 2 if sessions >= 16 else sets
    kc = [torch.randn(sessions * S, H, P_MAX + T, D, device="cuda", dtype=BF16) for _ in range(n_buf)]
    vc = [torch.randn_like(x) for x in kc]
    qs = q.flatten(0, 1).transpose(1, 2)  # (B*S, H, T, D)

    def sdpa(i):
        return F.scaled_dot_product_attention(qs, kc[i], vc[i], attn_mask=mask)

    contiguous = timed([lambda i=i: sdpa(i) for i in range(n_buf)])

    def gather_sdpa(tb):
        pages = pool[tb.long()]  # (B, P, 2, S, H, D)
        keys = torch.cat([pages[:, :, 0].permute(0, 2, 3, 1, 4), k.permute(0, 1, 3, 2, 4)], dim=3).flatten(0, 1)
        vals = torch.cat([pages[:, :, 1].permute(0, 2, 3, 1, 4), v.permute(0, 1, 3, 2, 4)], dim=3).flatten(0, 1)
        return F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask)

    gathered = timed([lambda tb=tb: gather_sdpa(tb) for tb in tables], iters=10)
    bw = io_bytes / ours / 1e6
    return {
        "sessions": sessions,
        "paged_triton_ms": ours,
        "paged_triton_ms_by_num_warps": sweep,
        "best_num_warps": best_warps,
        "contiguous_sdpa_ms": contiguous,
        "gather_then_sdpa_ms": gathered,
        "kv_cache_bytes": cache_bytes,
        "io_bytes": io_bytes,
        "achieved_gbs": bw,
        "fraction_of_copy_bandwidth": bw / copy_gbs,
        "ours_over_contiguous_sdpa": ours / contiguous,
    }


def prefix_attention_bench(sessions: int) -> dict:
    num_pages = max(sessions * 3 * 2, 64)
    pool = torch.randn(num_pages, 2, S, H, D, device="cuda", dtype=BF16)
    tables = [
        torch.stack([torch.randperm(num_pages, device="cuda")[:3] for _ in range(sessions)]).int() for _ in range(4)
    ]
    q = torch.randn(sessions, T * S, H, D, device="cuda", dtype=BF16)
    sweep = {
        f"{bm}x{w}": timed(
            [lambda tb=tb, bm=bm, w=w: paged_prefix_attention(q, pool, tb, block_m=bm, num_warps=w) for tb in tables]
        )
        for bm, w in ((64, 4), (128, 4), (128, 8))
    }
    ours = min(sweep.values())

    gathered = timed([lambda tb=tb: paged_prefix_attention_sdpa(q, pool, tb) for tb in tables])
    kk, vv = gather_prefix_kv(pool, tables[0])
    kt, vt, qt = kk.transpose(1, 2).contiguous(), vv.transpose(1, 2).contiguous(), q.transpose(1, 2)
    contiguous = timed([lambda: F.scaled_dot_product_attention(qt, kt, vt)])
    flops = 4 * sessions * H * (T * S) * (3 * S) * D
    return {
        "sessions": sessions,
        "paged_triton_ms": ours,
        "paged_triton_ms_by_block_m_x_warps": sweep,
        "gather_then_sdpa_ms": gathered,
        "contiguous_sdpa_ms": contiguous,
        "tflops_paged": flops / ours / 1e9,
    }


def _time_paged_write(sessions: int) -> float:
    pool = torch.empty(DEPTH, sessions * P_MAX + sessions * T, 2, S, H, D, device="cuda", dtype=BF16)
    k, v = torch.randn(2, sessions, T, S, H, D, device="cuda", dtype=BF16).unbind(0)
    pages = torch.randperm(pool.shape[1], device="cuda")[: sessions * T].view(sessions, T).int()

    def write_all_layers():
        for layer in range(DEPTH):
            paged_write(k, v, pool[layer], pages)

    return timed([write_all_layers], iters=10)


def _time_dense_roll(sessions: int) -> float:
    dense = torch.empty(DEPTH, sessions, P_MAX, S, 2 * H * D, device="cuda", dtype=BF16)
    new = torch.randn(DEPTH, sessions, T, S, 2 * H * D, device="cuda", dtype=BF16)

    def roll_and_write():
        rolled = torch.roll(dense, -T, dims=2)
        rolled[:, :, -T:] = new
        return rolled

    return timed([roll_and_write], iters=10)


def maintenance_bench(sessions: int) -> dict:
    """Per AR step, all layers: write 8 new frames. Paged: 28 scatter launches into free pages, no data
    moves. Reference: torch.roll of the dense cache by 8 frames, then write the new 8 frames at the end."""
    ours = _time_paged_write(sessions)
    torch.cuda.empty_cache()
    ref = _time_dense_roll(sessions)
    torch.cuda.empty_cache()
    return {"sessions": sessions, "paged_write_ms": ours, "dense_roll_and_write_ms": ref, "speedup": ref / ours}


def capacity(cfg) -> dict:
    model = CausalSTDiT(cfg).to("cuda", BF16).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # warm-up forward at the largest batch the server runs (16 sessions) to reserve activation memory
    pool = KVPool.for_sessions(cfg, 16, P_MAX, "cuda", BF16)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, cfg.prefix_frames, P_MAX)
    streams = [mgr.new_stream() for _ in range(16)]
    model.write(PagedKVCache(pool, mgr, streams), torch.randn(16, 4, 1, 32, 32, device="cuda"))
    model.denoise(PagedKVCache(pool, mgr, streams), torch.randn(16, 4, T, 32, 32, device="cuda"),
                  torch.full((16,), 500, device="cuda"))  # fmt: skip
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - model_bytes - pool.nbytes
    del pool, mgr, streams
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = int(free - activations - 2 * 2**30)  # keep 2 GiB for the allocator and the VAE decode
    big = KVPool.for_budget(cfg, budget, P_MAX, "cuda", BF16)
    sessions = big.num_pages // P_MAX
    page = KVPool.page_bytes(cfg, BF16)
    bookkeeping = P_MAX * 4 + 3 * 4 + 64  # page table row, prefix row, counters (host and device)
    return {
        "total_gib": total / 2**30,
        "model_gib": model_bytes / 2**30,
        "activation_reserve_gib": activations / 2**30,
        "pool_gib": big.nbytes / 2**30,
        "sessions_25_frames": sessions,
        "bytes_per_session": (P_MAX + cfg.prefix_frames) * page + bookkeeping,
        "kv_bytes_per_session": (P_MAX + cfg.prefix_frames) * page,
    }


def forward_bench(cfg, sessions_list) -> list[dict]:
    model = CausalSTDiT(cfg).randomize_(0).to("cuda", BF16).eval()
    rows = []
    for sessions in sessions_list:
        pool = KVPool.for_sessions(cfg, sessions, P_MAX, "cuda", BF16)
        mgr = PageManager(pool.num_pages, pool.num_prefix_pages, cfg.prefix_frames, P_MAX)
        streams = [mgr.new_stream() for _ in range(sessions)]
        paged = PagedKVCache(pool, mgr, streams)
        dense = DenseKVCache.for_model(model, sessions, P_MAX)
        model.write(paged, torch.randn(sessions, 4, 1, 32, 32, device="cuda"))
        model.write(dense, torch.randn(sessions, 4, 1, 32, 32, device="cuda"))
        for _ in range(3):
            model.write(paged, torch.randn(sessions, 4, T, 32, 32, device="cuda"))
            model.write(dense, torch.randn(sessions, 4, T, 32, 32, device="cuda"))
        x = torch.randn(sessions, 4, T, 32, 32, device="cuda")
        t = torch.full((sessions,), 500, device="cuda")
        row = {
            "sessions": sessions,
            "paged_ms": timed([lambda c=paged, x=x, t=t: model.denoise(c, x, t)], iters=10),
            "dense_ms": timed([lambda c=dense, x=x, t=t: model.denoise(c, x, t)], iters=10),
        }
        rows.append(row)
        pool = dense = paged = None
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="paged_cache.json")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    cfg = get_preset("XL/2").model
    result: dict = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": args.commit or git_commit(),
        "command": "python3 " + " ".join(sys.argv),
    }
    result["kernel_correctness_xl2_shapes"] = kernel_correctness()
    result["model_paged_vs_dense_rel_err"] = model_correctness(cfg)
    result["copy_bandwidth_gbs"] = copy_bandwidth()
    result["temporal_attention"] = [temporal_attention_bench(n, result["copy_bandwidth_gbs"]) for n in (1, 4, 16, 64)]
    result["prefix_attention"] = [prefix_attention_bench(n) for n in (1, 4, 16)]
    result["cache_maintenance"] = [maintenance_bench(n) for n in (1, 4, 16)]
    result["denoise_forward"] = forward_bench(cfg, (1, 4, 16))
    result["capacity"] = capacity(cfg)

    print(f"card {result['card']}, copy {result['copy_bandwidth_gbs']:.0f} GB/s")
    print("kernel rel err:", json.dumps(result["kernel_correctness_xl2_shapes"]))
    print("model paged vs dense:", json.dumps(result["model_paged_vs_dense_rel_err"]))
    print(f"{'sess':>4} {'paged ms':>9} {'contig sdpa':>11} {'gather+sdpa':>11} {'GB/s':>6} {'%copy':>6}")
    for r in result["temporal_attention"]:
        pct = 100 * r["fraction_of_copy_bandwidth"]
        print(f"{r['sessions']:>4} {r['paged_triton_ms']:>9.3f} {r['contiguous_sdpa_ms']:>11.3f} "
              f"{r['gather_then_sdpa_ms']:>11.3f} {r['achieved_gbs']:>6.0f} {pct:>5.0f}%")  # fmt: skip
    print("prefix:", json.dumps(result["prefix_attention"]))
    print("maintenance:", json.dumps(result["cache_maintenance"]))
    print("denoise forward:", json.dumps(result["denoise_forward"]))
    print("capacity:", json.dumps(result["capacity"]))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
