"""Compiled vs eager training step on the same batch: losses, outputs and gradients side by side (and NaNs), then
forward + backward time of each, for two prefix lengths.

    python bench/train_compile_check.py --device cuda --batch-size 128 --model MODEL_DIR   (random init without)

Prints one line per prefix length; `ca2vdm train --compile` is only worth its compile time where the speed-up holds.
"""

from __future__ import annotations

import argparse
import time

import torch

from ca2vdm.server.model.checkpoint import load_state_dict_strict, read_model_dir
from ca2vdm.server.model.config import get_preset
from ca2vdm.server.model.stdit import CausalSTDiT
from ca2vdm.server.train.losses import TrainingDiffusion
from ca2vdm.server.train.sprites import SpritesConfig, SpritesDataset
from ca2vdm.server.train.trainer import TrainConfig, init_for_training, step_loss, to_model_range, training_step_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default=None, help="start from this model directory's weights")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    dev = args.device
    pipe = get_preset(args.preset)
    model = init_for_training(CausalSTDiT(pipe.model), 0).to(dev).train()
    if args.model:
        load_state_dict_strict(model, read_model_dir(args.model)[1])
    compiled = torch.compile(model, dynamic=False)
    h, w = pipe.model.input_size[1:]
    data = SpritesDataset(SpritesConfig(height=h, width=w, num_frames=pipe.model.max_tpe_len), length=10**6)
    clips = to_model_range(torch.stack([data[i] for i in range(args.batch_size)]).to(dev))
    diffusion = TrainingDiffusion(device=torch.device(dev))
    gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(dev).manual_seed(1)

    def step(fn, inp: dict) -> tuple[torch.Tensor, dict, dict]:
        model.zero_grad(set_to_none=True)
        out, terms = step_loss(fn, diffusion, inp)  # the trainer's forward and loss, without the optimiser
        terms["loss"].backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), {k: round(float(v), 6) for k, v in terms.items()}, grads

    chunk, tpe = pipe.chunk_frames, pipe.model.max_tpe_len
    prefixes = [p for p in range(1, pipe.max_cache_frames + 1, chunk) if p + chunk <= tpe]
    for prefix in prefixes:
        inp = training_step_inputs(clips, prefix, chunk, diffusion, TrainConfig(), tpe, gen, noise_gen)
        out_e, loss_e, grad_e = step(model, inp)
        out_c, loss_c, grad_c = step(compiled, inp)
        rel = max(float((grad_e[n] - grad_c[n]).norm() / grad_e[n].norm().clamp_min(1e-12)) for n in grad_e)
        bad = [n for n in grad_c if not torch.isfinite(grad_c[n]).all()]
        print(f"P={prefix}: eager {loss_e} compiled {loss_c}; output max diff {(out_e - out_c).abs().max():.3g}, "
              f"finite {bool(torch.isfinite(out_c).all())}; worst gradient relative diff {rel:.3g}; "
              f"non-finite gradients {bad[:5]}", flush=True)  # fmt: skip
    if dev != "cuda":
        return
    for prefix in (prefixes[1], prefixes[-1]):
        inp = training_step_inputs(clips, prefix, chunk, diffusion, TrainConfig(), tpe, gen, noise_gen)
        for name, fn in (("eager", model), ("compiled", compiled)):
            for i in range(13):  # 3 warm-up steps, 10 timed
                if i == 3:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                step(fn, inp)
            torch.cuda.synchronize()
            print(f"P={prefix} {name}: {(time.perf_counter() - start) / 10 * 1e3:.1f} ms per forward + backward")


if __name__ == "__main__":
    main()
