"""`ca2vdm bench`: engine-level scenarios on one card, written as JSON with the card, commit and command.

Scenarios (random weights; XL/2 with the SD-VAE architecture at 256^2 by default):
- forward:   one denoising forward, 8-frame chunk, 25 cached frames, one session, on the paged pool;
- table5:    80 frames with 100 IDDPM steps, one session through the engine, decode included (paper Table 5);
- ar_steps:  time of each AR step for 30 steps, cached (write + denoising forwards) vs the recompute path;
- sessions:  N concurrent sessions (default 1/4/16/64) with 25 DDIM steps through the engine: time to first
             generated clip p50/p95, frames/s per session and in aggregate, fraction of the compute floor;
             peak GPU memory per session.
Every time is also given as a ratio to the compute floor: FLOPs / the card's measured bf16 matmul rate.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ca2vdm.server.cache.paged import PagedKVCache
from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.model import layers
from ca2vdm.server.model.loader import Pipeline, load_pipeline

from .caches import filled_cache, paged_pool
from .realtime import realtime_scenario
from .timing import cuda_sync, fp8_matmul_tflops, git_commit, matmul_tflops, timed_ms


def forward_scenario(pipe: Pipeline, tflops: float) -> dict:
    cfg = pipe.config
    pool, pages = paged_pool(pipe, 1)
    cache = filled_cache(pipe, pool, pages, 1, cfg.max_cache_frames)
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    x = torch.randn(1, c, cfg.chunk_frames, h, w, device=pipe.device)
    t = torch.full((1,), 500, device=pipe.device)
    # the counter has no formula for the GELU-epilogue GEMM (`_addmm_activation`): count the plain path, so
    # the floor is the same for every kernel choice
    epilogue, layers.GELU_EPILOGUE = layers.GELU_EPILOGUE, False
    try:
        with FlopCounterMode(display=False) as counter:
            pipe.model.denoise(cache, x, t)
    finally:
        layers.GELU_EPILOGUE = epilogue
    flops = counter.get_total_flops()
    ms = timed_ms(lambda: pipe.model.denoise(cache, x, t))
    floor_ms = flops / (tflops * 1e12) * 1e3
    row = {"denoise_ms": ms, "tflop": flops / 1e12, "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms}
    if pipe.device.type == "cuda":  # the same forward replayed as a CUDA graph
        from ca2vdm.server.engine.graphs import GraphedDenoiser

        graphed = GraphedDenoiser(pipe.model, pool, pages, tuple(x.shape[1:]), 1)
        eager = pipe.model.denoise(cache, x, t)
        replay = graphed(cache.streams, x, t)
        row["graph_vs_eager_max_abs_diff"] = (replay.float() - eager.float()).abs().max().item()
        row["denoise_graph_ms"] = timed_ms(lambda: graphed(cache.streams, x, t))
        row["graph_ratio_to_floor"] = row["denoise_graph_ms"] / floor_ms
    return row


def ar_steps_scenario(pipe: Pipeline, steps: int = 30) -> list[dict]:
    """Per AR step: the cached path (one denoising forward against the cache, and the chunk's cache write)
    against the recompute path (one forward over [<= 25 conditional | 8 noisy] frames). On CUDA every path is
    a CUDA graph (the recompute one captured per context length), so the times are GPU work, not Python
    launch overhead; on the CPU everything runs eagerly."""
    cfg = pipe.config
    mc = cfg.model
    pool, pages = paged_pool(pipe, 1)
    c, (h, w), n = mc.in_channels, mc.input_size[1:], cfg.chunk_frames
    stream = pages.new_stream()
    cuda = pipe.device.type == "cuda"
    if cuda:
        from ca2vdm.server.engine.graphs import GraphedDenoiser, GraphedWriter, capture

        denoiser = GraphedDenoiser(pipe.model, pool, pages, (c, n, h, w), 1)
        writer = GraphedWriter(pipe.model, pool, pages, (c, n, h, w), 1, frame_counts=(1, n),
                               mempool=denoiser.mempool)  # fmt: skip

        def denoise(x, t):
            return denoiser([stream], x, t)

        def write(clean):
            writer([stream], clean)
    else:

        def denoise(x, t):
            return pipe.model.denoise(PagedKVCache(pool, pages, [stream]), x, t)

        def write(clean):
            pipe.model.write(PagedKVCache(pool, pages, [stream]), clean)

    history = torch.randn(1, c, 1, h, w, device=pipe.device)
    write(history)
    rows = []
    for step in range(steps):
        x = torch.randn(1, c, n, h, w, device=pipe.device)
        t = torch.full((1,), 500, device=pipe.device)
        window = history[:, :, -cfg.max_cache_frames :]
        m = window.shape[2]
        xr = torch.cat([window, x], dim=2)
        tr = torch.cat([torch.zeros(1, m, device=pipe.device), t[:, None].float().expand(1, n)], dim=1)
        cond = torch.cat([torch.ones(1, m, device=pipe.device), torch.zeros(1, n, device=pipe.device)], dim=1)

        def recompute(xr=xr, tr=tr, cond=cond, start=history.shape[2] - m):
            return pipe.model(xr, tr, cond, tpe_start=start)

        with torch.no_grad():
            if cuda:
                graph, _ = capture(recompute, denoiser.mempool)
                recompute_ms = timed_ms(graph.replay, iters=5)
                del graph
            else:
                recompute_ms = timed_ms(recompute, iters=3)
        cached = timed_ms(lambda: denoise(x, t), iters=5)  # noqa: B023
        cached_frames = stream.num_cached
        clean = torch.randn(1, c, n, h, w, device=pipe.device)
        cuda_sync()
        start = time.perf_counter()
        write(clean)
        cuda_sync()
        rows.append({"ar_step": step, "cached_frames": cached_frames, "denoise_ms": cached,
                     "write_ms": (time.perf_counter() - start) * 1e3, "recompute_ms": recompute_ms})  # fmt: skip
        history = torch.cat([history, clean], dim=2)[:, :, -cfg.max_cache_frames - n :]
    return rows


async def _run_sessions(engine: Engine, params: list[SessionParams]) -> list[dict]:
    async def one(p: SessionParams) -> dict:
        start = time.perf_counter()
        handle = await engine.start_session(p)
        times = []
        async for clip in handle:
            times.append((time.perf_counter() - start, clip.first_frame, clip.num_frames))
        return {"clips": times, "end": time.perf_counter() - start}

    return await asyncio.gather(*(one(p) for p in params))


def sessions_scenario(pipe: Pipeline, n: int, steps: int, chunks: int, max_batch: int, tflops: float,
                      forward: dict) -> dict:  # fmt: skip
    height, width = pipe.frame_size
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
    frames = 1 + chunks * pipe.config.chunk_frames
    # throughput: every session as fast as the engine goes (pace "max"); `bench --realtime` measures live viewers
    params = [SessionParams(image=image, seed=i, sampler="ddim", steps=steps, num_frames=frames, pace="max")
              for i in range(n)]  # fmt: skip
    gc.collect()  # engines of earlier scenarios hold pools through reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    config = EngineConfig(max_sessions=n, max_batch=min(max_batch, n), max_waiting=0, max_background_sessions=n)
    engine = Engine(pipe, config).start()
    try:
        start = time.perf_counter()
        results = asyncio.run(_run_sessions(engine, params))
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    peak = (torch.cuda.max_memory_allocated() - base) if torch.cuda.is_available() else 0
    first = sorted(r["clips"][1][0] for r in results)  # clip 0 is the condition frame; clip 1 the first generated
    per_session_fps = [(frames - 1) / r["end"] for r in results]
    generated = n * (frames - 1)
    ideal_s = generated / pipe.config.chunk_frames * steps * forward["floor_ms"] / 1e3  # batch-1 FLOPs per chunk step
    return {
        "sessions": n,
        "max_batch": min(max_batch, n),
        "frames_per_session": frames,
        "time_to_first_generated_clip_p50_s": first[len(first) // 2],
        "time_to_first_generated_clip_p95_s": first[min(len(first) - 1, int(0.95 * len(first)))],
        "frames_per_s_per_session_median": statistics.median(per_session_fps),
        "aggregate_frames_per_s": generated / wall,
        "fraction_of_compute_floor": ideal_s / wall,
        "wall_s": wall,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_per_session_gib": peak / n / 2**30,
    }


def check_scenario(pipe: Pipeline) -> dict:
    """Batched engine sessions (paged pool, CUDA graphs) against the offline loop run alone (dense cache,
    eager), same seeds: mean absolute difference of the uint8 frames."""
    from ca2vdm.server.model.generate import generate_video

    height, width = pipe.frame_size
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen) for _ in range(4)]
    params = [SessionParams(image=im, seed=i, sampler="ddim", steps=10, num_frames=17, pace="max")
              for i, im in enumerate(images)]  # fmt: skip
    engine = Engine(pipe, EngineConfig(max_sessions=4, max_batch=4)).start()
    try:
        results = asyncio.run(_collect_frames(engine, params))
    finally:
        engine.stop()
    diffs = []
    for p, frames in zip(params, results, strict=True):
        solo = generate_video(pipe, pipe.sampler("ddim", 10), image=p.image, num_frames=17, seed=p.seed)
        diffs.append((frames.float() - solo.float()).abs().mean().item())
    return {"sessions": 4, "mean_abs_diff_uint8_per_session": diffs}


async def _collect_frames(engine: Engine, params: list[SessionParams]) -> list[torch.Tensor]:
    async def one(p: SessionParams) -> torch.Tensor:
        handle = await engine.start_session(p)
        return torch.cat([clip.frames async for clip in handle])

    return await asyncio.gather(*(one(p) for p in params))


def run_benchmarks(args) -> dict:
    pipe = load_pipeline(args.model, preset=args.preset, vae=args.vae, device=args.device, precision=args.precision,
                         text_encoder=getattr(args, "text_encoder", None),
                         text_device=getattr(args, "text_encoder_device", "auto"))  # fmt: skip
    result: dict = {
        "card": torch.cuda.get_device_name() if pipe.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": args.commit or git_commit(),
        "command": "ca2vdm " + " ".join(sys.argv[1:]),
        "model": args.model,
    }
    tflops = matmul_tflops()
    result["bf16_matmul_tflops"] = tflops
    result["precision"] = args.precision
    if args.precision == "fp8" and torch.cuda.is_available():
        result["fp8_matmul_tflops"] = fp8_matmul_tflops()  # the floor stays FLOPs / the bf16 rate
    scenarios = args.scenarios.split(",")
    forward = forward_scenario(pipe, tflops)
    result["forward"] = forward
    if "check" in scenarios:
        result["check"] = check_scenario(pipe)
    if "ar_steps" in scenarios:
        result["ar_steps"] = ar_steps_scenario(pipe)
    if "table5" in scenarios:
        result["table5"] = _table5(pipe)
    if "realtime" in scenarios:
        result["realtime"] = realtime_scenario(pipe, forward["floor_ms"], steps=args.steps, max_batch=args.max_batch,
                                               hold_s=args.hold, probes=args.probes,
                                               job_frames=getattr(args, "job_frames", 0),
                                               compile_decoder=not getattr(args, "eager_decoder", False))  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if "sessions" in scenarios:
        counts = [int(v) for v in args.sessions.split(",")]
        result["sessions"] = []
        for n in counts:
            try:
                row = sessions_scenario(pipe, n, args.steps, args.chunks, args.max_batch, tflops, forward)
            except torch.OutOfMemoryError as exc:  # record it and keep the other numbers
                row = {"sessions": n, "error": f"out of memory: {exc}"}
            result["sessions"].append(row)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _table5(pipe: Pipeline) -> dict:
    height, width = pipe.frame_size
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8)
    params = SessionParams(image=image, seed=0, sampler="iddpm", steps=100, num_frames=80, pace="max")
    engine = Engine(pipe, EngineConfig(max_sessions=1, max_batch=1)).start()
    try:
        start = time.perf_counter()
        asyncio.run(_run_sessions(engine, [params]))
        return {"frames": 80, "iddpm_steps": 100, "seconds": time.perf_counter() - start}
    finally:
        engine.stop()
