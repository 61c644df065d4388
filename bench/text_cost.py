"""What text conditioning costs the server, on one GPU: XL/2-text with random weights (caption features of T5 v1.1
XXL: 4096 channels, 120 tokens) and a random T5-XXL-sized encoder (24 layers, 4096 wide), bf16.

1. The text encoder: one prompt encoded (a miss of the prompt cache) and again (a hit).
2. One batched denoising step (the engine's runner, CUDA graphs, 25 cached frames per session) for B sessions
   (B = 1, 4, 8): without a prompt (the null caption), with a prompt, and guided (two rows a session: the
   unconditional branch): guided vs unguided in the same run.
3. A prompt switch: the runner's part alone (keep: nothing to do; recache: rewriting the cached frames under the
   new prompt, one write of both rows), and end to end on a running engine (one guided session at pace max):
   from the switch to the first clip conditioned on the new prompt, keep vs recache.
4. How much each mode changes the video: the offline loop with the prompt switched before AR step 3, its latents
   of AR steps 3-5 against the unswitched loop's (relative L2), keep vs recache.

Usage: python bench/text_cost.py --out text_cost.json [--commit SHA]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ca2vdm.server.benchmark.timing import git_commit  # noqa: E402
from ca2vdm.server.engine.config import EngineConfig  # noqa: E402
from ca2vdm.server.engine.engine import Engine  # noqa: E402
from ca2vdm.server.engine.runner import ModelRunner  # noqa: E402
from ca2vdm.server.engine.session import Session, SessionParams  # noqa: E402
from ca2vdm.server.model.generate import Conditioner, perturb_for_cache  # noqa: E402
from ca2vdm.server.model.loader import load_pipeline  # noqa: E402
from ca2vdm.server.model.prompt import Prompt  # noqa: E402

PROMPTS = ["a slow moving camera view of a surfboard on the beach, with sea waves",
           "a red kite flying over green hills on a windy afternoon, clouds drifting by"]  # fmt: skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompt(pipe, text: str, scale: float) -> Prompt:
    f = pipe.text.encode(text)
    return Prompt(text, f.y, f.mask, scale)


def encoder_ms(pipe) -> dict:
    enc = pipe.text
    text = "a new prompt that is not cached yet, about a dog running along a river bank at dawn"
    sync()
    t = time.perf_counter()
    enc.encode(text)
    sync()
    miss = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for _ in range(100):
        enc.encode(text)
    hit = (time.perf_counter() - t) * 1e3 / 100
    misses = []
    for i in range(5):
        sync()
        t = time.perf_counter()
        enc.encode(f"{text}, take {i}")
        sync()
        misses.append((time.perf_counter() - t) * 1e3)
    return {"first_encode_ms": round(miss, 2), "encode_miss_ms_p50": round(statistics.median(misses), 2),
            "encode_hit_ms": round(hit, 4)}  # fmt: skip


def fill(runner: ModelRunner, sessions: list[Session]) -> None:
    """Prefill and run chunks until every queue holds 25 frames (3 written chunks after the condition frame)."""
    runner.prefill(sessions)
    for _ in range(3):
        for g in (runner.states[s.id] for s in sessions):
            g.step = 0  # one denoising step finishes the chunk: the cache contents do not matter here
        done = runner.denoise(sessions)
        runner.continue_chunks(done)


def step_ms(runner: ModelRunner, sessions: list[Session], iters: int = 30) -> float:
    gens = [runner.states[s.id] for s in sessions]
    times = []
    for i in range(iters + 5):
        for g in gens:
            g.step = g.sampler.num_steps - 1 - (i % 10)
        sync()
        t = time.perf_counter()
        runner.denoise(sessions)
        sync()
        if i >= 5:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def forward_costs(pipe, batches: list[int]) -> dict:
    config = EngineConfig(max_sessions=2 * max(batches), max_batch=2 * max(batches))
    runner = ModelRunner(pipe, config)
    runner.capture_graphs()
    out = {}
    p_plain, p_guided = prompt(pipe, PROMPTS[0], 1.0), prompt(pipe, PROMPTS[0], 7.0)
    for b in batches:
        row = {}
        for name, p in (("no_prompt", None), ("prompt", p_plain), ("guided_7", p_guided)):
            sessions = [Session(SessionParams(seed=i, steps=25, prompt=p)) for i in range(b)]
            fill(runner, sessions)
            row[name + "_ms"] = round(step_ms(runner, sessions), 3)
            for s in sessions:
                runner.release(s)
        row["guided_over_prompt"] = round(row["guided_7_ms"] / row["prompt_ms"], 3)
        out[str(b)] = row
        print(f"B={b}: {row}", flush=True)
    return out


def switch_runner_ms(pipe) -> dict:
    runner = ModelRunner(pipe, EngineConfig(max_sessions=4, max_batch=4))
    runner.capture_graphs()
    out = {}
    for scale in (1.0, 7.0):
        s = Session(SessionParams(seed=1, steps=25, prompt=prompt(pipe, PROMPTS[0], scale)))
        fill(runner, [s])
        g = runner.states[s.id]
        new = prompt(pipe, PROMPTS[1], scale)
        times = {}
        for recache in (False, True):
            ms = []
            for _ in range(10):
                sync()
                t = time.perf_counter()
                runner._switch(g, new, recache)
                sync()
                ms.append((time.perf_counter() - t) * 1e3)
            times["recache_ms" if recache else "keep_ms"] = round(statistics.median(ms), 3)
        out["guided_7" if scale > 1 else "unguided"] = times
        runner.release(s)
    return out


async def _switch_latency(engine: Engine, pipe, recache: bool, switches: int) -> list[float]:
    p = SessionParams(seed=3, steps=25, num_frames=None, pace="max", prompt=prompt(pipe, PROMPTS[0], 7.0))
    handle = await engine.start_session(p)
    latencies = []
    asked_at, target = None, None
    try:
        async for clip in handle:
            now = time.perf_counter()
            if asked_at is not None and clip.index >= target:
                latencies.append(now - asked_at)
                asked_at = None
                if len(latencies) == switches:
                    break
            if asked_at is None and clip.index >= 2 and clip.index % 3 == 2:
                asked_at = time.perf_counter()
                handle.set_prompt(prompt(pipe, PROMPTS[len(latencies) % 2 == 0], 7.0), recache=recache)
                target = clip.index + 2  # the chunk in flight keeps the old prompt; the one after has the new
    finally:
        handle.cancel()
    return latencies


def switch_latency(pipe, switches: int = 5) -> dict:
    engine = Engine(pipe, EngineConfig(max_sessions=4, max_batch=4)).start()
    try:
        out = {}
        for recache in (False, True):
            lat = asyncio.run(_switch_latency(engine, pipe, recache, switches))
            out["recache" if recache else "keep"] = {"to_first_new_clip_s_p50": round(statistics.median(lat), 4),
                                                       "to_first_new_clip_s": [round(x, 4) for x in lat]}  # fmt: skip
        return out
    finally:
        engine.stop()


@torch.no_grad()
def _offline_latents(pipe, first: Prompt, second: Prompt, switch_at: int | None, recache: bool,
                     chunks: int = 6) -> list[torch.Tensor]:  # fmt: skip
    cfg, model = pipe.config, pipe.model
    sampler = pipe.sampler("ddim", 25).to(pipe.device)
    gen = torch.Generator(pipe.device).manual_seed(7)
    text = Conditioner(model, first)
    cache = text.cache(cfg.max_cache_frames)
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    first_frame = model.bov_token[None, :, None].float()
    written = [perturb_for_cache(first_frame, sampler, cfg.prefix_perturb_t, gen)]
    text.write(cache, written[0])
    out = []
    for k in range(chunks):
        if k == switch_at:
            text.set_prompt(second)
            if recache:
                history = torch.cat(written, dim=2)[:, :, -cfg.max_cache_frames :]
                cache = text.cache(cfg.max_cache_frames)
                text.write(cache, history)
        noise = torch.randn((1, c, cfg.chunk_frames, h, w), generator=gen, device=pipe.device)
        chunk = sampler.sample_loop(lambda x, t, cache=cache: text.denoise(cache, x, t), noise, generator=gen)
        out.append(chunk)
        written.append(perturb_for_cache(chunk, sampler, cfg.prefix_perturb_t, gen))
        text.write(cache, written[-1])
    return out


def visual_difference(pipe) -> dict:
    first, second = prompt(pipe, PROMPTS[0], 7.0), prompt(pipe, PROMPTS[1], 7.0)
    base = _offline_latents(pipe, first, second, None, False)
    out = {}
    for recache in (False, True):
        switched = _offline_latents(pipe, first, second, 3, recache)
        out["recache" if recache else "keep"] = [round(((a - b).norm() / b.norm()).item(), 4)
                                                 for a, b in zip(switched[3:], base[3:], strict=True)]  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(switched[:3], base[:3], strict=True))
    return {"rel_l2_vs_unswitched_by_ar_step_3_4_5": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--model", default="random:XL/2-text", help="(random:tiny-text --device cpu: a smoke test)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device, precision="auto")
    load_s = time.perf_counter() - t
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"benchmark": "text_cost", "card": card, "torch": torch.__version__,
              "commit": args.commit or git_commit(), "command": " ".join(["python", *sys.argv]),
              "model": f"{args.model} ({next(pipe.model.parameters()).dtype}) with its text encoder",
              "load_s": round(load_s, 1)}  # fmt: skip

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["text_encoder"] = encoder_ms(pipe)
    print(result["text_encoder"], flush=True)
    save()
    result["denoise_step"] = forward_costs(pipe, [int(b) for b in args.batches.split(",")])
    save()
    result["switch_runner"] = switch_runner_ms(pipe)
    print(result["switch_runner"], flush=True)
    save()
    result["switch_latency"] = switch_latency(pipe)
    print(result["switch_latency"], flush=True)
    save()
    result["visual_difference"] = visual_difference(pipe)
    print(result["visual_difference"], flush=True)
    save()


if __name__ == "__main__":
    main()
