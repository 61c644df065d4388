"""What a self-generated prefix costs a training step: milliseconds per optimisation step, per variant.

    python bench/train_rollout_speed.py --preset small --batch-size 128 --out rollout_speed.json

On one fixed batch of procedural sprites (no data loading in the timing), times `Trainer.optimise` with a true
prefix (the baseline of the same run), with a degraded one, and with a self-generated one in fp32 and under bf16
autocast, at P = 17 and 25, and reports each as a multiple of the plain step. Also checks that the bf16 rollout
stays close to the fp32 one on the same draws. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch

from ca2vdm.server.model.config import get_preset
from ca2vdm.server.model.loader import DEFAULT_MODEL_DIR
from ca2vdm.server.train.context import rollout_prefix
from ca2vdm.server.train.sprites import SpritesConfig, SpritesDataset
from ca2vdm.server.train.trainer import TrainConfig, Trainer, to_model_range


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(trainer: Trainer, clips, background, prefix: int, rollout: bool, n: int) -> float:
    """Milliseconds per optimisation step, after two untimed ones."""
    for _ in range(2):
        trainer.optimise(clips, prefix, background, rollout)
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.optimise(clips, prefix, background, rollout)
    _sync(trainer.device)
    return 1e3 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rollout-steps", type=int, default=10)
    ap.add_argument(
        "--init-from",
        default=None,
        help="model directory to start from (default for `small`: the packaged"
        " model, so the rollouts are real generations)",
    )
    ap.add_argument("--out", default="rollout_speed.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = get_preset(args.preset)
    init = args.init_from or (str(DEFAULT_MODEL_DIR) if args.preset == "small" else None)
    h, w = pipe.model.input_size[1:]
    data = SpritesDataset(SpritesConfig(height=h, width=w, num_frames=pipe.model.max_tpe_len), length=args.batch_size,
                          with_background=True)  # fmt: skip
    items = [data[i] for i in range(args.batch_size)]
    clips = to_model_range(torch.stack([c for c, _ in items]).to(device))
    background = to_model_range(torch.stack([b for _, b in items]).to(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(steps=1, batch_size=args.batch_size, rollout_steps=args.rollout_steps)
        variants = {
            "true prefix": (base, False, None),
            "degraded (all samples)": (replace(base, degrade_prob=1.0), False, background),
            "self-generated, fp32": (base, True, None),
            "self-generated, bf16 autocast": (replace(base, rollout_bf16=True), True, None),
        }
        for name, (cfg, rollout, bg) in variants.items():
            trainer = Trainer(pipe, cfg, data, tmp, device=str(device))
            if init:
                trainer.init_from(init)
            for prefix in (17, 25):
                ms = time_step(trainer, clips, bg, prefix, rollout, args.steps)
                rows.append({"variant": name, "prefix": prefix, "ms_per_step": ms})
        # the bf16 rollout against the fp32 one, same weights and draws
        window = clips[:, :, :25]
        outs = []
        for bf16 in (False, True):
            gen = torch.Generator(device).manual_seed(0)
            outs.append(rollout_prefix(trainer.ema, window, 9, 25, 8, trainer._rollout_sampler, 100, gen, bf16=bf16))
        rel = float((outs[1][:, :, 9:] - outs[0][:, :, 9:]).norm() / outs[0][:, :, 9:].norm())
    plain = {r["prefix"]: r["ms_per_step"] for r in rows if r["variant"] == "true prefix"}
    for r in rows:
        r["x_plain_step"] = r["ms_per_step"] / plain[r["prefix"]]
    print(f"{'variant':32} {'P':>3} {'ms/step':>9} {'x plain':>8}")
    for r in rows:
        print(f"{r['variant']:32} {r['prefix']:>3} {r['ms_per_step']:>9.1f} {r['x_plain_step']:>8.2f}")
    print(f"bf16 rollout vs fp32, relative difference of the generated frames ({init or 'fresh weights'}): {rel:.4f}")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "args": vars(args), "weights": init or "fresh", "rows": rows,
              "bf16_vs_fp32_rollout_rel_diff": rel}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
