"""`ca2vdm train`: the paper's recipe on clips of P + l frames.

Each step picks a prefix length P from {1, 1 + l, ..., P_max} (l = chunk length), cuts P + l frames from
each clip, keeps the prefix clean (timestep 0, mask channel 1; optionally perturbed to t_p, as at inference),
noises the l target frames at one random timestep per sample, and trains epsilon (L_simple) and the
learned variance (L_vlb) on the targets only. When P + l reaches max_tpe_len the temporal position index
starts at a random offset per sample, so the model has seen the cyclic wrap it meets in long generations.
AdamW, bf16 autocast on CUDA, gradient clipping, EMA weights; checkpoints hold everything needed to resume,
and the EMA weights are also written as a servable model directory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ca2vdm.server.model.checkpoint import load_state_dict_strict, read_model_dir, save_model_dir
from ca2vdm.server.model.config import PipelineConfig
from ca2vdm.server.model.diffusion import make_sampler
from ca2vdm.server.model.stdit import CausalSTDiT

from .context import degrade_prefix, rollout_prefix
from .losses import TrainingDiffusion

log = logging.getLogger("ca2vdm.train")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prefix_perturb_t: int = 100  # training-time perturbation of the clean prefix (reference: 100 of 1000)
    log_every: int = 50
    ckpt_every: int = 500
    seed: int = 0
    num_workers: int = 0  # data-loader processes (procedural clips are rendered on the CPU)
    warmup_steps: int = 0  # linear learning-rate warm-up from 0
    max_seconds: float | None = None  # wall-clock budget: stop (and save) at the first step past it
    compile: bool = False  # run the training forward under torch.compile (the saved weights are unaffected)
    # imperfect context (`context.py`), the ground-truth continuation still the target:
    degrade_prob: float = 0.0  # share of samples whose prefix is blurred and faded towards the background
    rollout_prob: float = 0.0  # share of steps whose prefix ends in chunks the EMA model generated itself
    rollout_steps: int = 10  # DDIM steps of those generated chunks (the served default)
    rollout_bf16: bool = False  # generate them under bf16 autocast on CUDA (as the training forward runs)

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.log_every, self.ckpt_every) < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size, log_every, ckpt_every must be >= 1 and lr > 0")
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise ValueError("num_workers and warmup_steps must be >= 0")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.prefix_perturb_t < 1000:
            raise ValueError("ema_decay in [0, 1), prefix_perturb_t in [0, 1000)")
        if not (0 <= self.degrade_prob <= 1 and 0 <= self.rollout_prob <= 1) or self.rollout_steps < 1:
            raise ValueError("degrade_prob and rollout_prob in [0, 1], rollout_steps >= 1")


def prefix_lengths(pipe: PipelineConfig) -> list[int]:
    """{1, 1 + l, ..., P_max}, keeping P + l within the temporal position table."""
    l, p_max, tpe = pipe.chunk_frames, pipe.max_cache_frames, pipe.model.max_tpe_len
    return [p for p in range(1, p_max + 1, l) if p + l <= tpe]


def init_for_training(model: CausalSTDiT, seed: int) -> CausalSTDiT:
    """Reference-style initialisation: Xavier linears, small timestep MLP, zero output and temporal/prefix
    projections (the new branches start as identities), identity mask-channel merge."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    w = model.x_embedder.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1]):
        torch.nn.init.normal_(lin.weight, std=0.02)
    torch.nn.init.zeros_(model.final_layer.linear.weight)
    torch.nn.init.zeros_(model.final_layer.linear.bias)
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn_temp.proj, *([block.attn_cf.proj] if block.attn_cf is not None else [])):
                torch.nn.init.zeros_(proj.weight)
                torch.nn.init.zeros_(proj.bias)
            if block.cross_attn is not None:
                torch.nn.init.zeros_(block.cross_attn.proj.weight)
                torch.nn.init.zeros_(block.cross_attn.proj.bias)
            if block.attn_temp_pre_merge is not None:
                m = block.attn_temp_pre_merge
                torch.nn.init.zeros_(m.weight)
                torch.nn.init.zeros_(m.bias)
                m.weight[:, : m.out_features].copy_(torch.eye(m.out_features))
    return model


def training_step_inputs(clips: torch.Tensor, prefix: int, chunk: int, diffusion: TrainingDiffusion, cfg: TrainConfig,
                         max_tpe_len: int, gen: torch.Generator, noise_gen: torch.Generator | None = None,
                         context: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:  # fmt: skip
    """Model inputs for one step from clips (B, C, T, H, W) in [-1, 1]. `gen` (CPU) draws the scalars; the
    Gaussian noise comes from `noise_gen` on the clips' device (default: `gen`, on the CPU). Drawing ~10 M
    normals per step on the CPU took longer than the whole GPU step. `context` maps the window of P + l true
    frames to the P prefix frames the model sees instead of the true ones (degraded or self-generated; the
    targets stay the true frames)."""
    b, _, t_total = clips.shape[:3]
    dev = clips.device
    length = prefix + chunk
    start = int(torch.randint(0, t_total - length + 1, (1,), generator=gen))
    x0 = clips[:, :, start : start + length]
    shown = x0[:, :, :prefix] if context is None else context(x0)
    noise_gen = noise_gen or gen  # per-sample draws on the device: a host-to-device copy would sync the stream
    t_noise = torch.randint(0, diffusion.num_steps, (b,), generator=noise_gen, device=noise_gen.device).to(dev)
    t = torch.zeros(b, length, dtype=torch.long, device=dev)
    t[:, prefix:] = t_noise[:, None]
    noise = torch.randn(x0.shape, generator=noise_gen, device=noise_gen.device).to(dev)
    x_t = diffusion.q_sample(x0, t, noise)
    if cfg.prefix_perturb_t > 0:  # the prefix as the model will see it at inference: slightly noised, labelled t=0
        tp = torch.full((b, prefix), cfg.prefix_perturb_t, dtype=torch.long, device=dev)
        x_t[:, :, :prefix] = diffusion.q_sample(
            shown, tp, torch.randn(shown.shape, generator=noise_gen, device=noise_gen.device).to(dev)
        )
    else:
        x_t[:, :, :prefix] = shown
    cond = torch.zeros(b, length, device=dev)
    cond[:, :prefix] = 1
    tpe_start: torch.Tensor | int = 0  # per-sample offsets, drawn on the device (an int would recompile under compile)
    if length >= max_tpe_len:
        tpe_start = torch.randint(0, max_tpe_len, (b,), generator=noise_gen, device=noise_gen.device).to(dev)
    return {"x0": x0, "x_t": x_t, "t": t, "noise": noise, "cond": cond, "tpe_start": tpe_start}


def step_loss(
    forward: Callable[..., torch.Tensor], diffusion: TrainingDiffusion, inputs: dict
) -> tuple[torch.Tensor, dict]:
    """The model output and loss terms of one step's inputs (`training_step_inputs`); `forward` is the model or its
    compiled wrapper. bf16 autocast on CUDA; the loss covers the noisy (non-conditional) frames only."""
    on_cuda = inputs["x_t"].is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        out = forward(inputs["x_t"], inputs["t"], inputs["cond"], tpe_start=inputs["tpe_start"])
    mask = (1 - inputs["cond"])[:, None, :, None, None]
    return out, diffusion.losses(out, inputs["x0"], inputs["x_t"], inputs["t"], inputs["noise"], mask)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as (1 + step) / (10 + step): a fixed 0.999 over a short run keeps
    0.999 ** steps of the initial weights (16% after 1800 steps), whose zero output layer then shrinks every
    prediction of the EMA model (a 0.8x epsilon made sampling diverge in pixel space)."""
    return min(decay, (1 + step) / (10 + step))


def to_model_range(clips: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] floats; float clips are taken as already scaled."""
    return clips.float() / 127.5 - 1.0 if clips.dtype == torch.uint8 else clips


def _single_threaded(_worker: int) -> None:
    torch.set_num_threads(1)  # one process per core renders clips; intra-op threads would only contend


class Trainer:
    def __init__(self, pipe: PipelineConfig, cfg: TrainConfig, data: Dataset, out_dir: str | Path,
                 device: str = "cpu") -> None:  # fmt: skip
        self.pipe, self.cfg, self.out = pipe, cfg, Path(out_dir)
        self.device = torch.device(device)
        self.model = init_for_training(CausalSTDiT(pipe.model), cfg.seed).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # one graph per prefix length (4 shapes); dynamic shapes would trade speed for fewer compilations
        self.forward = torch.compile(self.model, dynamic=False) if cfg.compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")  # fmt: skip
        self._ema_params, self._params = list(self.ema.parameters()), list(self.model.parameters())
        self.diffusion = TrainingDiffusion(device=self.device)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        workers = {"num_workers": cfg.num_workers}
        if cfg.num_workers > 0:
            workers.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_single_threaded)
        self.loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=shuffle_gen,
                                 pin_memory=self.device.type == "cuda", **workers)  # fmt: skip
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed + 2)
        self.step = 0
        self.history: list[dict] = []
        self._rollout_sampler = make_sampler("ddim", cfg.rollout_steps, clip_x0=pipe.codec == "pixel")
        self._batch_iter = None  # one stream of batches across train() calls (workers keep prefetching)

    def state(self) -> dict:
        """Everything a resumed run needs. AdamW's moments are kept in bf16 (loading casts them back to fp32):
        the whole state of the `small` preset is then 58 MB instead of 77, small enough to carry from one
        10-minute GPU run to the next."""
        opt = self.opt.state_dict()
        opt["state"] = {i: {k: v.to(torch.bfloat16) if k.startswith("exp_avg") else v for k, v in st.items()}
                        for i, st in opt["state"].items()}  # fmt: skip
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": opt,
                "step": self.step, "gen": self.gen.get_state(),
                "noise_gen": self.noise_gen.get_state(), "history": self.history,
                "pipe": self.pipe.to_dict(), "cfg": asdict(self.cfg)}  # fmt: skip

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "trainer.pt.tmp"
        torch.save(self.state(), tmp)
        tmp.replace(self.out / "trainer.pt")
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        # EMA weights, servable with --model; generation perturbs cached frames as training perturbed the prefix
        # (the reference's inference also takes the training value: a clean cache is out of distribution)
        served = replace(self.pipe, prefix_perturb_t=self.cfg.prefix_perturb_t)
        save_model_dir(self.out / "model", served, self.ema)

    def init_from(self, model_dir: str | Path) -> None:
        """Start from a servable model's weights (e.g. the EMA of an earlier run), with a fresh optimiser."""
        config, state_dict = read_model_dir(model_dir)
        if config.model != self.pipe.model:
            raise ValueError(f"{model_dir} holds a different model shape than the one being trained")
        load_state_dict_strict(self.model, state_dict)
        self.ema.load_state_dict(self.model.state_dict())
        log.info("initialised from %s", model_dir)

    def resume(self) -> bool:
        path = self.out / "trainer.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], state["history"]
        self.gen.set_state(state["gen"].cpu())  # map_location moved it to the training device
        if "noise_gen" in state:
            try:
                self.noise_gen.set_state(state["noise_gen"].cpu())
            except RuntimeError:  # saved on another device type (a CUDA run resumed on the CPU): its own seed
                log.warning("noise generator state from another device type: keeping this run's seed")
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _batches(self):
        while True:
            yield from self.loader

    def _next_batch(self) -> torch.Tensor:
        if self._batch_iter is None:
            self._batch_iter = self._batches()
        return next(self._batch_iter)

    def _context(self, background: torch.Tensor | None, prefix: int, rollout: bool):
        """The `context` of `training_step_inputs` for this step: the model's own chunks after the first 1 + l true
        frames (`rollout`), then, per sample with probability degrade_prob, blur and fade; None: the true prefix."""
        cfg, chunk = self.cfg, self.pipe.chunk_frames
        degrade = cfg.degrade_prob > 0 and background is not None
        if not (rollout or degrade):
            return None

        def context(window: torch.Tensor) -> torch.Tensor:
            shown = window[:, :, :prefix]
            if rollout:
                shown = rollout_prefix(self.ema, window, 1 + chunk, prefix, chunk, self._rollout_sampler,
                                       cfg.prefix_perturb_t, self.noise_gen,
                                       bf16=cfg.rollout_bf16 and window.is_cuda)  # fmt: skip
            if degrade:
                b, dev = window.shape[0], window.device
                apply = torch.rand(b, generator=self.noise_gen, device=self.noise_gen.device).to(dev) < cfg.degrade_prob
                shown = degrade_prefix(shown, background, apply, self.noise_gen)
            return shown

        return context

    def optimise(self, clips: torch.Tensor, prefix: int, background: torch.Tensor | None = None,
                 rollout: bool = False) -> tuple[dict, torch.Tensor]:  # fmt: skip
        """One optimisation step on clips (B, C, T, H, W) in [-1, 1] with `prefix` conditional frames; returns the
        loss terms and the gradient norm as device tensors. Nothing in it waits for the GPU. `background`
        (B, C, H, W) lets degrade_prob fade the prefix; `rollout` generates its later chunks with the EMA model."""
        cfg, pipe = self.cfg, self.pipe
        context = self._context(background, prefix, rollout)
        inputs = training_step_inputs(clips, prefix, pipe.chunk_frames, self.diffusion, cfg, pipe.model.max_tpe_len,
                                      self.gen, self.noise_gen, context)  # fmt: skip
        _, terms = step_loss(self.forward, self.diffusion, inputs)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, self._params, 1 - ema_decay_at(self.step, cfg.ema_decay))
        return terms, grad_norm

    def train(self) -> list[dict]:
        cfg, pipe = self.cfg, self.pipe
        prefixes = prefix_lengths(pipe)
        rollout_prefixes = [p for p in prefixes if p > 1 + pipe.chunk_frames]  # room for a generated chunk
        rng = random.Random(cfg.seed + self.step)
        started = time.perf_counter()
        if self.step >= cfg.steps:  # a resumed state already at (or past) the target: write its model directory
            self.save()
            return self.history
        data_wait = 0.0  # seconds spent waiting for batches (a data-bound run shows it growing with `seconds`)
        with tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step") as bar:
            while self.step < cfg.steps:
                if cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds:
                    log.info("time budget of %.0f s spent at step %d: stopping", cfg.max_seconds, self.step)
                    self.save()
                    break
                if cfg.warmup_steps:
                    for group in self.opt.param_groups:
                        group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps)
                waited = time.perf_counter()
                batch = self._next_batch()
                clips, background = batch if isinstance(batch, (tuple, list)) else (batch, None)
                clips = to_model_range(clips.to(self.device, non_blocking=True))
                if background is not None:
                    background = to_model_range(background.to(self.device, non_blocking=True))
                data_wait += time.perf_counter() - waited
                rollout = bool(rollout_prefixes) and cfg.rollout_prob > 0 and rng.random() < cfg.rollout_prob
                prefix = rng.choice(rollout_prefixes if rollout else prefixes)
                terms, grad_norm = self.optimise(clips, prefix, background, rollout)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row = {"step": self.step, **{k: float(v.detach()) for k, v in terms.items()},
                           "grad_norm": float(grad_norm), "seconds": time.perf_counter() - started,
                           "data_wait_s": data_wait}  # fmt: skip
                    self.history.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}")
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"loss is {row['loss']} at step {self.step}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                bar.update(1)
        return self.history
