"""The parts of an engine step, before and after each speed change, on one XL/2 (random weights).

In one process, on one card:
1. matmul rates: bf16 and float8 (row-wise scales) for an 8192^3 product;
2. numerics: one recompute forward (25 conditional + 8 noisy frames) and a 17-frame DDIM-25 generation in
   fp32, bf16 (plain GELU / GELU epilogue) and fp8, each compared with fp32;
3. the graphed denoising forward at 1 and 16 sessions (25 cached frames) for each variant, with the CUDA
   time by kernel kind of one eager forward;
4. the cache write: eager vs graphed, 1-frame (a condition frame) and 8-frame chunks;
5. the SD-VAE (random weights): decode of 16 chunks and of one, encode + decode of one condition frame, in
   the NCHW and channels-last layouts and with cuDNN's algorithm search;
6. a whole runner step (batch assembly, graph replay, sampler update) at 1 and 16 sessions against the graph
   replay alone: what the host adds per step when it cannot run ahead of the GPU.

Usage: python bench/engine_parts.py --out engine_parts.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.profile_forward import cuda_ms_by_kind  # noqa: E402
from ca2vdm.kernels.fp8 import quantize_model_  # noqa: E402
from ca2vdm.server.benchmark.caches import filled_cache, paged_pool  # noqa: E402
from ca2vdm.server.benchmark.timing import fp8_matmul_tflops, git_commit, matmul_tflops, timed_ms  # noqa: E402
from ca2vdm.server.cache.paged import PagedKVCache  # noqa: E402
from ca2vdm.server.engine.config import EngineConfig  # noqa: E402
from ca2vdm.server.engine.graphs import GraphedDenoiser, GraphedWriter  # noqa: E402
from ca2vdm.server.engine.runner import ModelRunner  # noqa: E402
from ca2vdm.server.engine.session import Session, SessionParams  # noqa: E402
from ca2vdm.server.model import layers  # noqa: E402
from ca2vdm.server.model.loader import load_pipeline  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kinds(fn) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {k: round(v, 3) for k, v in cuda_ms_by_kind(prof).items()}


def with_cache(pipe, sessions: int):
    """A pool holding `sessions` streams with full 25-frame queues (the benchmark's own setup)."""
    pool, pages = paged_pool(pipe, sessions)
    cache = filled_cache(pipe, pool, pages, sessions, pipe.config.max_cache_frames)
    return pool, pages, cache.streams, cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="engine_parts.json")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--sections", default="numerics,forward,write,vae,runner")
    args = parser.parse_args()
    sections = args.sections.split(",")
    torch.backends.cuda.matmul.allow_tf32 = False
    result: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "commit": args.commit or git_commit(), "command": "python3 " + " ".join(sys.argv)}  # fmt: skip
    result["bf16_matmul_tflops"] = matmul_tflops()
    result["fp8_matmul_tflops"] = fp8_matmul_tflops()
    print(json.dumps(result), flush=True)

    bf16 = load_pipeline("random:XL/2", device="cuda")
    fp8 = copy.copy(bf16)
    fp8.model = copy.deepcopy(bf16.model)
    quantize_model_(fp8.model)
    fp32 = copy.copy(bf16)
    fp32.model = copy.deepcopy(bf16.model).float()
    fp32.codec = copy.deepcopy(bf16.codec).to("cuda", torch.float32)
    cfg = bf16.config
    if "numerics" in sections:
        numerics(result, fp32, bf16, fp8)
    del fp32
    torch.cuda.empty_cache()
    if "forward" in sections:
        forward(result, cfg, bf16, fp8)
    if "write" in sections:
        writes(result, cfg, bf16)
    if "vae" in sections:
        vae(result, bf16)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if "runner" in sections:
        runner_steps(result, bf16, fp8)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def numerics(result: dict, fp32, bf16, fp8) -> None:
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 4, 33, 32, 32, device="cuda", generator=gen)
    t = torch.cat([torch.zeros(1, 25, device="cuda"), torch.full((1, 8), 500.0, device="cuda")], dim=1)
    cond = (t == 0).float()
    with torch.no_grad():
        ref = fp32.model(x, t, cond)
        layers.GELU_EPILOGUE = False
        plain = bf16.model(x, t, cond)
        layers.GELU_EPILOGUE = True
        epi = bf16.model(x, t, cond)
        q = fp8.model(x, t, cond)
    noisy = slice(25, 33)
    result["forward_rel_err_vs_fp32"] = {
        "bf16": rel(plain[:, :4, noisy], ref[:, :4, noisy]),
        "bf16_gelu_epilogue": rel(epi[:, :4, noisy], ref[:, :4, noisy]),
        "fp8": rel(q[:, :4, noisy], ref[:, :4, noisy]),
        "gelu_epilogue_vs_plain_bf16": rel(epi[:, :4, noisy], plain[:, :4, noisy]),
    }
    from ca2vdm.server.model.generate import generate_video

    image = torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    videos = {}
    for name, pipe in (("fp32", fp32), ("bf16", bf16), ("fp8", fp8)):
        start = time.perf_counter()
        videos[name] = generate_video(pipe, pipe.sampler("ddim", 25), image=image, num_frames=17, seed=0).float()
        print(name, "generation", round(time.perf_counter() - start, 1), "s", flush=True)
    result["generation_mean_abs_diff_uint8_vs_fp32"] = {
        k: (videos[k] - videos["fp32"]).abs().mean().item() for k in ("bf16", "fp8")
    }
    result["generation_mean_abs_diff_uint8_fp8_vs_bf16"] = (videos["fp8"] - videos["bf16"]).abs().mean().item()
    print(json.dumps({k: v for k, v in result.items() if "err" in k or "diff" in k}), flush=True)


def forward(result: dict, cfg, bf16, fp8) -> None:
    """3. the graphed forward per variant."""
    result["forward"] = []
    for sessions in (1, 16):
        pool, pages, streams, cache = with_cache(bf16, sessions)
        xs = torch.randn(sessions, 4, 8, 32, 32, device="cuda")
        ts = torch.full((sessions,), 500, device="cuda")
        row: dict = {"sessions": sessions}
        for name, model, epilogue in (("bf16", bf16.model, False), ("bf16_gelu_epilogue", bf16.model, True),
                                      ("fp8", fp8.model, True)):  # fmt: skip
            layers.GELU_EPILOGUE = epilogue
            graphed = GraphedDenoiser(model, pool, pages, tuple(xs.shape[1:]), sessions)
            row[f"{name}_graph_ms"] = timed_ms(lambda g=graphed, s=streams, x=xs, t=ts: g(s, x, t), iters=20)
            row[f"{name}_cuda_ms_by_kind"] = kinds(lambda m=model, c=cache, x=xs, t=ts: m.denoise(c, x, t))
            del graphed
        layers.GELU_EPILOGUE = True
        result["forward"].append(row)
        print(json.dumps(row), flush=True)
        del pool, pages, streams, cache
        torch.cuda.empty_cache()


def writes(result: dict, cfg, bf16) -> None:
    """4. writes: eager vs graphed."""
    result["write"] = []
    for sessions, frames in ((1, 1), (1, 8), (16, 8)):
        pool, pages = paged_pool(bf16, sessions)
        streams = [pages.new_stream() for _ in range(sessions)]
        xw = torch.randn(sessions, 4, frames, 32, 32, device="cuda")
        writer = GraphedWriter(bf16.model, pool, pages, (4, 8, 32, 32), sessions, frame_counts=(frames,))

        def eager(st=streams, p=pool, m=pages, x=xw):
            bf16.model.write(PagedKVCache(p, m, st), x)

        row = {"sessions": sessions, "frames": frames, "eager_ms": timed_ms(eager, iters=5),
               "graph_ms": timed_ms(lambda w=writer, st=streams, x=xw: w(st, x), iters=5)}  # fmt: skip
        result["write"].append(row)
        print(json.dumps(row), flush=True)
        del pool, pages, writer
        torch.cuda.empty_cache()


def vae(result: dict, bf16) -> None:
    """5. the codec: NCHW, channels-last, and NCHW with cuDNN's algorithm search."""
    codec = bf16.codec
    lat = torch.randn(16, 4, 8, 32, 32, device="cuda")
    img = torch.rand(1, 3, 1, 256, 256, device="cuda") * 2 - 1
    result["vae"] = {}
    for layout in ("nchw", "channels_last", "nchw_cudnn_benchmark"):
        codec.set_channels_last(layout == "channels_last")
        torch.backends.cudnn.benchmark = layout == "nchw_cudnn_benchmark"
        with torch.no_grad():
            result["vae"][layout] = {
                "decode_128_frames_ms": timed_ms(lambda: codec.decode(lat), iters=3),
                "decode_8_frames_ms": timed_ms(lambda: codec.decode(lat[:1]), iters=5),
                "encode_1_frame_ms": timed_ms(lambda: codec.encode(img), iters=5),
                "decode_1_frame_ms": timed_ms(lambda: codec.decode(lat[:1, :, :1]), iters=5),
            }
        print(layout, json.dumps(result["vae"][layout]), flush=True)
    torch.backends.cudnn.benchmark = False
    a = codec.decode(lat[:2])
    codec.set_channels_last(True)
    result["vae"]["channels_last_vs_nchw_max_abs_diff"] = (codec.decode(lat[:2]) - a).abs().max().item()
    codec.set_channels_last(False)


def runner_steps(result: dict, bf16, fp8) -> None:
    """6. runner steps vs graph replays (20 back-to-back, one synchronisation at the end)."""
    result["runner_step"] = []
    for name, pipe in (("bf16", bf16), ("fp8", fp8)):
        for sessions in (1, 16):
            runner = ModelRunner(pipe, EngineConfig(max_sessions=sessions, max_batch=sessions))
            runner.capture_graphs()
            live = [Session(SessionParams(image=None, seed=i, sampler="ddim", steps=25)) for i in range(sessions)]
            runner.prefill(live)

            def steps(r=runner, s=live):
                for _ in range(20):
                    r.denoise(s)
                for x in s:
                    r.states[x.id].step = 24

            assert runner.graphs is not None
            gens = [runner.states[s.id] for s in live]
            xs, ts = torch.cat([g.x for g in gens]), torch.full((sessions,), 500, device="cuda")

            def replays(g=runner.graphs, gens=gens, x=xs, t=ts):
                for _ in range(20):
                    g([z.pages for z in gens], x, t)

            row = {"precision": name, "sessions": sessions, "runner_step_ms": timed_ms(steps, iters=3) / 20,
                   "graph_replay_ms": timed_ms(replays, iters=3) / 20}  # fmt: skip
            result["runner_step"].append(row)
            print(json.dumps(row), flush=True)
            del runner, live
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
