"""`ca2vdm eval`: generate 30 AR steps (240 frames) from the first frame of ground-truth sprite videos and score
every 8-frame window against the ground truth with the tracking metric (object count, speed, jumps, collapse).
Ground truth scored against itself is reported beside the model, as the ceiling."""

from __future__ import annotations

import numpy as np
import torch

from server.model.generate import generate_video
from server.model.loader import Pipeline

from .sprites import SpritesConfig, render_video
from .tracking import compare_per_window


def _mean_finite(values: list[float]) -> float:
    """Mean over the finite values (pos_err is NaN in windows without a matched object); NaN if none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(pipe: Pipeline, *, seeds: list[int], ar_steps: int = 30, sampler: str = "ddim", steps: int = 25) -> dict:
    """Mean per-window scores over `seeds` for the model and for the ground truth itself."""
    height, width = pipe.frame_size
    frames = 1 + ar_steps * pipe.config.chunk_frames
    cfg = SpritesConfig(height=height, width=width)
    model_rows, truth_rows = [], []
    for seed in seeds:
        truth, _ = render_video(cfg, seed, frames)  # (N, H, W, 3) uint8
        video = generate_video(pipe, pipe.sampler(sampler, steps), image=torch.from_numpy(truth[0]), num_frames=frames,
                               seed=seed).numpy()  # fmt: skip
        model_rows.append(compare_per_window(video[1:], truth[1:], window=pipe.config.chunk_frames))
        truth_rows.append(compare_per_window(truth[1:], truth[1:], window=pipe.config.chunk_frames))
    per_step = [float(np.mean([rows[i]["score"] for rows in model_rows])) for i in range(ar_steps)]
    truth_step = [float(np.mean([rows[i]["score"] for rows in truth_rows])) for i in range(ar_steps)]
    # what the score is made of, averaged over videos and AR steps (pos_err: drift from the true continuation)
    parts = {key: _mean_finite([r[key] for rows in model_rows for r in rows])
             for key in ("s_count", "s_speed", "s_jump", "blank", "frozen", "noise", "pos_err")}  # fmt: skip
    return {"model": pipe.name, "seeds": seeds, "ar_steps": ar_steps, "sampler": sampler, "steps": steps,
            "score_per_step": per_step, "truth_score_per_step": truth_step,
            "score": float(np.mean(per_step)), "truth_score": float(np.mean(truth_step)), "parts": parts}  # fmt: skip
