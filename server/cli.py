"""`ca2vdm` command line. Every flag also reads the environment variable CA2VDM_<FLAG>."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model.diffusion import SAMPLERS

log = logging.getLogger("ca2vdm")


def _env(flag: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    value = os.environ.get("CA2VDM_" + flag.upper().replace("-", "_"))
    return default if value is None or value == "" else cast(value)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=_env("model", None),
        help="model directory, official .pt/.pth checkpoint (with --preset), or random:PRESET; "
        "default: the packaged model",
    )
    p.add_argument(
        "--preset", default=_env("preset", None), help="preset of an official checkpoint: XL/2, XL/2-text, B/2, tiny"
    )
    p.add_argument("--vae", default=_env("vae", None), help="SD-VAE directory (diffusers layout) for latent models")
    p.add_argument("--device", default=_env("device", "auto"), choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=_env("precision", "auto"), choices=["auto", "bf16", "fp8"],
                   help="fp8: block linears in float8 e4m3 (GPUs of compute capability 8.9+, bf16 models)")  # fmt: skip
    p.add_argument("--text-encoder", default=_env("text_encoder", None), metavar="DIR",
                   help="text-conditioned models: a local T5 v1.1 XXL directory (transformers' T5 encoder and its "
                   "tokenizer); nothing is downloaded")  # fmt: skip
    p.add_argument(
        "--text-encoder-device",
        default=_env("text_encoder_device", "auto"),
        choices=["auto", "cpu", "cuda"],
        help="where the text encoder runs (auto: the model's device)",
    )
    p.add_argument("--prompt-cache-size", type=int, default=_env("prompt_cache_size", 1024, int),
                   help="prompts whose encoded features are kept (LRU; 0: none)")  # fmt: skip


def _load(args: argparse.Namespace) -> Any:
    """The pipeline the model flags describe."""
    from .model.loader import load_pipeline

    return load_pipeline(args.model, preset=args.preset, vae=args.vae, device=args.device, precision=args.precision,
                         text_encoder=args.text_encoder, text_device=args.text_encoder_device,
                         text_cache_size=args.prompt_cache_size)  # fmt: skip


def _prompt(pipe: Any, text: str | None, guidance_scale: float | None) -> Any:
    """`--prompt` / `--guidance-scale` -> the model's Prompt (None without a prompt); refused for a model without
    text, and guidance without a prompt."""
    from .model.prompt import Prompt

    if not pipe.config.takes_text:
        if text is not None or guidance_scale is not None:
            raise ValueError(f"model {pipe.name} is not text-conditioned: it takes no --prompt or --guidance-scale")
        return None
    if text is None:
        if guidance_scale is not None and guidance_scale > 1:
            raise ValueError("--guidance-scale needs a --prompt")
        return None
    features = pipe.text.encode(text)
    scale = pipe.config.guidance_scale if guidance_scale is None else guidance_scale
    return Prompt(text, features.y, features.mask, scale)


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .media import load_image, write_mp4
    from .model.generate import generate_video

    if args.frames < 1:
        raise ValueError("--frames must be >= 1")
    pipe = _load(args)
    image = None
    if args.image is not None:
        image = load_image(args.image, size=pipe.frame_size)
    sampler_name = args.sampler or pipe.config.default_sampler
    steps = args.steps or pipe.default_steps(sampler_name)
    sampler = pipe.sampler(sampler_name, steps)
    prompt = _prompt(pipe, args.prompt, args.guidance_scale)
    h, w = pipe.frame_size
    log.info(
        "model %s on %s: %dx%d at %d fps, %s with %d steps, seed %d",
        pipe.name,
        pipe.device,
        w,
        h,
        pipe.config.fps,
        sampler_name,
        steps,
        args.seed,
    )
    start = time.perf_counter()
    frames = generate_video(
        pipe,
        sampler,
        image=None if image is None else torch.as_tensor(image),
        num_frames=args.frames,
        seed=args.seed,
        prompt=prompt,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    write_mp4(args.out, frames, fps=pipe.config.fps)
    log.info(
        "wrote %s: %d frames in %.1f s (%.2f frames/s)",
        args.out,
        frames.shape[0],
        elapsed,
        frames.shape[0] / elapsed,
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark.scenarios import run_benchmarks

    if args.realtime:
        args.scenarios = "forward,realtime"
    elif args.steps is None:
        args.steps = 25
    result = run_benchmarks(args)
    log.info("wrote %s", args.out)
    fwd = result["forward"]
    graph = f", CUDA graph {fwd['denoise_graph_ms']:.2f} ms" if "denoise_graph_ms" in fwd else ""
    print(f"forward: {fwd['denoise_ms']:.2f} ms eager{graph} (floor {fwd['floor_ms']:.2f} ms)")
    if "check" in result:
        print("engine vs offline, mean |diff| (uint8):", result["check"]["mean_abs_diff_uint8_per_session"])
    for row in result.get("sessions", []):
        if "error" in row:
            print(f"{row['sessions']:>3} sessions: {row['error'][:200]}")
            continue
        print(
            f"{row['sessions']:>3} sessions: first clip p50 {row['time_to_first_generated_clip_p50_s']:.2f} s, "
            f"{row['frames_per_s_per_session_median']:.1f} fps/session, {row['aggregate_frames_per_s']:.1f} fps, "
            f"{100 * row['fraction_of_compute_floor']:.0f}% of floor, "
            f"{row['peak_memory_per_session_gib']:.2f} GiB/session"
        )
    if "realtime" in result:
        rt = result["realtime"]
        p50, p99 = rt["joining_first_clip_p50_s"], rt["joining_first_clip_p99_s"]
        print(f"real time ({rt['steps']} steps, {rt['fps']} fps): {rt['sessions_held']} sessions held "
              f"{rt['held_for_s']:.0f} s with {rt['stalls_in_hold']} stalls (ramp stopped: {rt['ramp_stop']}); "
              f"joining first clip p50 {p50 or float('nan'):.2f} s, p99 {p99 or float('nan'):.2f} s; "
              f"{100 * rt['fraction_of_compute_floor']:.0f}% of floor; engine estimate "
              f"{rt['engine_estimate_sessions']} sessions")  # fmt: skip
        if (job := rt.get("job")) is not None:
            print(f"a {job['frames']}-frame job at that load: {'finished' if job['finished'] else 'NOT finished'} in "
                  f"{job['wall_s']:.1f} s, {job['stalls']} viewer stalls meanwhile")  # fmt: skip
    if "table5" in result:
        print(f"80 frames x 100 IDDPM steps: {result['table5']['seconds']:.1f} s")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.serving import uvicorn_config
    from .api.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    if args.ray:
        return _serve_ray(args, settings)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
    return 0


def _serve_ray(args: argparse.Namespace, settings: Any) -> int:
    """The Ray Serve application (server/cluster): on the cluster at --ray-address, or on a Ray started here with
    this machine's GPUs; Serve's HTTP proxy on --host/--port. Settings travel to every replica as arguments (the
    CA2VDM_* variables of this process, not of the nodes)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --ray needs the cluster extra: pip install 'ca2vdm[cluster]'", file=sys.stderr)
        return 2
    from .cluster.app import build

    values = settings.model_dump(exclude_unset=True)
    for name, value in list(values.items()):
        if hasattr(value, "get_secret_value"):
            values[name] = value.get_secret_value()
        elif isinstance(value, Path):
            values[name] = str(value)
    cluster = {k: getattr(args, k) for k in ("replicas", "min_replicas", "max_replicas", "session_dir",
                                              "gpus_per_replica") if getattr(args, k) is not None}  # fmt: skip
    try:
        app = build({**values, **cluster})  # checks the arguments before anything starts
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    print(f"ca2vdm on Ray Serve: http://{settings.host}:{settings.port}/ (Ctrl-C stops it)", flush=True)
    serve.run(app, name="ca2vdm", route_prefix="/", blocking=True)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .model.config import get_preset
    from .model.loader import resolve_device
    from .train.trainer import TrainConfig, Trainer

    pipe = get_preset(args.preset)
    if pipe.codec != "pixel":
        raise ValueError("training runs in pixel space for now: use --preset tiny (or a pixel preset)")
    size = pipe.model.input_size[1:]
    frames = pipe.model.max_tpe_len
    if args.data == "sprites":
        from .train.sprites import SpritesConfig, SpritesDataset

        # scenes 1e6 * (1 + seed) onwards: disjoint across seeds, and never an evaluation scene (seeds 10000...)
        data = SpritesDataset(SpritesConfig(height=size[0], width=size[1], num_frames=frames), length=1_000_000,
                              seed=1_000_000 * (1 + args.seed), with_background=args.degrade_prob > 0)  # fmt: skip
    else:
        from .train.video_folder import VideoFolderDataset

        if args.degrade_prob > 0:
            raise ValueError("--degrade-prob needs each clip's background: only --data sprites has it")
        data = VideoFolderDataset(args.data, size=size, num_frames=frames, seed=args.seed)
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      ckpt_every=args.ckpt_every, log_every=args.log_every, num_workers=args.num_workers,
                      warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, max_seconds=max_seconds,
                      compile=args.compile, degrade_prob=args.degrade_prob, rollout_prob=args.rollout_prob,
                      rollout_steps=args.rollout_steps, rollout_bf16=args.rollout_bf16)  # fmt: skip
    trainer = Trainer(pipe, cfg, data, args.out, device=str(resolve_device(args.device)))
    if args.init_from and not (args.resume and (Path(args.out) / "trainer.pt").is_file()):
        trainer.init_from(args.init_from)
    if args.resume:
        trainer.resume()
    history = trainer.train()
    log.info("trained %d steps; final loss %.4f; servable model in %s", trainer.step,
             history[-1]["loss"] if history else float("nan"), f"{args.out}/model")  # fmt: skip
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .train.evaluate import evaluate

    pipe = _load(args)
    seeds = list(range(args.seed, args.seed + args.videos))
    result = evaluate(pipe, seeds=seeds, ar_steps=args.ar_steps, sampler=args.sampler, steps=args.steps,
                      keep_videos=3 if args.sheet else 0)  # fmt: skip
    if args.sheet:
        from PIL import Image

        from .train.evaluate import contact_sheet

        Image.fromarray(contact_sheet(result.pop("videos"))).save(args.sheet)
    print(f"{'AR step':>7} {'model':>6} {'truth':>6}")
    for i, (m, t) in enumerate(zip(result["score_per_step"], result["truth_score_per_step"], strict=True)):
        print(f"{i:>7} {m:>6.3f} {t:>6.3f}")
    print(f"{'mean':>7} {result['score']:>6.3f} {result['truth_score']:>6.3f}")
    print("model, mean per window: " + ", ".join(f"{k} {v:.3f}" for k, v in result["parts"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from .train.package import package_from_files

    out = package_from_files(args.model_dir, args.out, args.runs, args.eval, args.random_eval, args.data, args.card,
                             args.sheet, args.limitations, args.long_eval)  # fmt: skip
    print(f"packaged {args.model_dir} into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca2vdm", description="Ca2-VDM streaming video generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video offline into an MP4")
    _add_model_flags(gen)
    gen.add_argument("--image", default=_env("image", None), help="condition image (PNG/JPEG); frame 0 of the video")
    gen.add_argument("--frames", type=int, default=_env("frames", None, int), required=_env("frames", None) is None)
    gen.add_argument("--steps", type=int, default=_env("steps", None, int), help="denoising steps per chunk")
    gen.add_argument("--sampler", choices=SAMPLERS, default=_env("sampler", None))
    gen.add_argument("--seed", type=int, default=_env("seed", 0, int))
    gen.add_argument("--prompt", default=_env("prompt", None), help="text-conditioned models: what the video shows")
    gen.add_argument("--guidance-scale", type=float, default=_env("guidance_scale", None, float),
                     help="classifier-free guidance (1: off; default: the model's)")  # fmt: skip
    gen.add_argument("--out", default=_env("out", None), required=_env("out", None) is None, help="output MP4")
    gen.set_defaults(func=_cmd_generate)

    serve = sub.add_parser("serve", help="serve the web API (settings also from CA2VDM_* variables)")
    _add_model_flags(serve)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--data-dir", default=None)
    serve.add_argument(
        "--api-key", default=None, help="require this key (visible in ps: prefer --api-key-file or CA2VDM_API_KEY)"
    )
    serve.add_argument("--api-key-file", default=None, help="read the required API key from this file")
    serve.add_argument("--max-sessions", type=int, default=None)
    serve.add_argument("--max-batch", type=int, default=None)
    scale = serve.add_argument_group("scale-out on Ray Serve (docs/scale-out.md)")
    scale.add_argument("--ray", action="store_true", help="serve the Ray Serve app: one engine replica per GPU")
    scale.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start Ray here)")
    scale.add_argument("--replicas", type=int, default=None, help="engine replicas (default 1)")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscale between these (with --max-replicas)")
    scale.add_argument("--max-replicas", type=int, default=None)
    scale.add_argument("--gpus-per-replica", type=float, default=None)
    scale.add_argument("--session-dir", default=None, help="a directory every replica shares: handover on scale-down")
    serve.set_defaults(func=_cmd_serve)

    train = sub.add_parser("train", help="train a model with the Ca2-VDM recipe (procedural sprites or a video folder)")
    train.add_argument("--preset", default=_env("preset", "tiny"))
    train.add_argument("--data", default=_env("data", "sprites"), help="'sprites' or a folder of videos")
    train.add_argument("--steps", type=int, default=_env("steps", 10_000, int))
    train.add_argument("--batch-size", type=int, default=_env("batch_size", 32, int))
    train.add_argument("--lr", type=float, default=_env("lr", 1e-4, float))
    train.add_argument("--warmup-steps", type=int, default=_env("warmup_steps", 0, int))
    train.add_argument("--ema-decay", type=float, default=_env("ema_decay", 0.999, float))
    train.add_argument("--num-workers", type=int, default=_env("num_workers", 0, int), help="data-loader processes")
    train.add_argument("--max-minutes", type=float, default=_env("max_minutes", None, float),
                       help="wall-clock budget: stop and save at the first step past it")  # fmt: skip
    train.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    train.add_argument(
        "--degrade-prob",
        type=float,
        default=_env("degrade_prob", 0.0, float),
        help="share of samples whose prefix is blurred and faded (sprites only)",
    )
    train.add_argument(
        "--rollout-prob",
        type=float,
        default=_env("rollout_prob", 0.0, float),
        help="share of steps whose prefix ends in chunks the model generated itself",
    )
    train.add_argument(
        "--rollout-steps",
        type=int,
        default=_env("rollout_steps", 10, int),
        help="DDIM steps of those self-generated chunks",
    )
    train.add_argument("--rollout-bf16", action="store_true", help="generate them under bf16 autocast on CUDA")
    train.add_argument("--seed", type=int, default=_env("seed", 0, int))
    train.add_argument("--log-every", type=int, default=_env("log_every", 50, int))
    train.add_argument("--ckpt-every", type=int, default=_env("ckpt_every", 1000, int))
    train.add_argument("--device", default=_env("device", "auto"), choices=["auto", "cpu", "cuda"])
    train.add_argument("--resume", action="store_true", help="continue from OUT/trainer.pt")
    train.add_argument("--init-from", default=_env("init_from", None),
                       help="start from the weights of a model directory (fresh optimiser)")  # fmt: skip
    train.add_argument("--out", default=_env("out", None), required=_env("out", None) is None)
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="score 30 AR steps on procedural sprites against the ground truth")
    _add_model_flags(ev)
    ev.add_argument("--videos", type=int, default=_env("videos", 4, int))
    ev.add_argument("--ar-steps", type=int, default=_env("ar_steps", 30, int))
    ev.add_argument("--sampler", choices=SAMPLERS, default=_env("sampler", "ddim"))
    ev.add_argument("--steps", type=int, default=_env("steps", 25, int))
    ev.add_argument("--seed", type=int, default=_env("seed", 10_000, int), help="first ground-truth seed")
    ev.add_argument("--out", default=_env("out", None), help="write the scores as JSON")
    ev.add_argument("--sheet", default=None, help="write a PNG: truth above generated, every 12th frame, 3 videos")
    ev.set_defaults(func=_cmd_eval)

    pkg = sub.add_parser("package", help="package a trained model directory with its model card")
    pkg.add_argument("model_dir", help="the trained model directory (OUT/model of ca2vdm train)")
    pkg.add_argument(
        "--runs", required=True, help="JSON list of the training runs: command, steps, minutes, history_file"
    )
    pkg.add_argument("--eval", required=True, help="ca2vdm eval --out JSON of the trained model")
    pkg.add_argument("--random-eval", default=None, help="ca2vdm eval --out JSON of random weights, for the card")
    pkg.add_argument("--data", default="procedural sprites (server/train/sprites.py), 33-frame clips")
    pkg.add_argument("--card", required=True, help="the accelerator it was trained on")
    pkg.add_argument("--sheet", default=None, help="the PNG of ca2vdm eval --sheet, shown in the card")
    pkg.add_argument("--limitations", default=None, help="what the weights cannot do yet (a card section)")
    pkg.add_argument("--long-eval", default=None, help="ca2vdm eval --ar-steps 120 JSON, summarised per 10 AR steps")
    pkg.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights" / "default"))
    pkg.set_defaults(func=_cmd_package)

    bench = sub.add_parser("bench", help="engine benchmark scenarios (JSON with card, commit, command)")
    _add_model_flags(bench)
    bench.set_defaults(model=_env("model", "random:XL/2"))
    bench.add_argument("--scenarios", default=_env("scenarios", "check,forward,ar_steps,table5,sessions"))
    bench.add_argument("--sessions", default=_env("sessions", "1,4,16,64"), help="comma-separated session counts")
    bench.add_argument(
        "--steps",
        type=int,
        default=_env("steps", None, int),
        help="DDIM steps per chunk (default: 25, or the model's own with --realtime)",
    )
    bench.add_argument(
        "--realtime",
        action="store_true",
        help="only the forward and the real-time scenario: viewers held at the playback rate",
    )
    bench.add_argument("--hold", type=float, default=_env("hold", 60.0, float), help="real-time hold, seconds")
    bench.add_argument("--probes", type=int, default=_env("probes", 10, int), help="sessions joining the held load")
    bench.add_argument("--job-frames", type=int, default=_env("job_frames", 0, int),
                       help="with --realtime: a REST job of this many frames at the held load (0: none)")  # fmt: skip
    bench.add_argument("--eager-decoder", action="store_true", help="with --realtime: do not compile the decoder")
    bench.add_argument("--chunks", type=int, default=_env("chunks", 2, int), help="chunks generated per session")
    bench.add_argument("--max-batch", type=int, default=_env("max_batch", 16, int))
    bench.add_argument("--commit", default=_env("commit", None))
    bench.add_argument("--out", default=_env("out", "bench.json"))
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # bad input: one clear line, no traceback
        print(f"ca2vdm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
