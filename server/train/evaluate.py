"""`ca2vdm eval`: generate 30 AR steps (240 frames) from the first frame of ground-truth sprite videos and score
every 8-frame window against the ground truth with the tracking metric (object count, speed, jumps, collapse).
Ground truth scored against itself is reported beside the model, as the ceiling."""

from __future__ import annotations

import numpy as np
import torch

from ca2vdm.server.model.generate import generate_video
from ca2vdm.server.model.loader import Pipeline

from .sprites import SpritesConfig, render_video
from .tracking import compare_per_window


def _mean_finite(values: list[float]) -> float:
    """Mean over the finite values (pos_err is NaN in windows without a matched object); NaN if none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], every: int = 12, scale: int = 2) -> np.ndarray:
    """(H', W', 3) uint8: for each (truth, generated) pair of videos (N, H, W, 3), a row of truth frames 0, every,
    2 * every, ... above the same frames generated; pixels enlarged `scale` times."""
    rows = []
    for truth, video in pairs:
        idx = range(0, min(len(truth), len(video)), every)
        rows += [np.concatenate([truth[i] for i in idx], 1), np.concatenate([video[i] for i in idx], 1)]
    sheet = np.concatenate(rows, 0)
    return sheet.repeat(scale, 0).repeat(scale, 1)


def evaluate(pipe: Pipeline, *, seeds: list[int], ar_steps: int = 30, sampler: str = "ddim", steps: int = 25,
             keep_videos: int = 0) -> dict:  # fmt: skip
    """Mean per-window scores over `seeds` for the model and for the ground truth itself. The first
    `keep_videos` (truth, generated) pairs come back under "videos" (not JSON-serialisable: pop it first)."""
    height, width = pipe.frame_size
    frames = 1 + ar_steps * pipe.config.chunk_frames
    cfg = SpritesConfig(height=height, width=width)
    model_rows, truth_rows, kept = [], [], []
    for seed in seeds:
        truth, _ = render_video(cfg, seed, frames)  # (N, H, W, 3) uint8
        video = generate_video(pipe, pipe.sampler(sampler, steps), image=torch.from_numpy(truth[0]), num_frames=frames,
                               seed=seed).numpy()  # fmt: skip
        if len(kept) < keep_videos:
            kept.append((truth, video))
        model_rows.append(compare_per_window(video[1:], truth[1:], window=pipe.config.chunk_frames))
        truth_rows.append(compare_per_window(truth[1:], truth[1:], window=pipe.config.chunk_frames))
    per_step = [float(np.mean([rows[i]["score"] for rows in model_rows])) for i in range(ar_steps)]
    # share of the videos whose window is mostly blank or mostly frozen: a dead video, whatever its score
    collapsed = [float(np.mean([max(rows[i]["blank"], rows[i]["frozen"]) > 0.5 for rows in model_rows]))
                 for i in range(ar_steps)]  # fmt: skip
    truth_step = [float(np.mean([rows[i]["score"] for rows in truth_rows])) for i in range(ar_steps)]
    # what the score is made of, averaged over videos and AR steps (pos_err: drift from the true continuation)
    parts = {key: _mean_finite([r[key] for rows in model_rows for r in rows])
             for key in ("s_count", "s_speed", "s_jump", "blank", "frozen", "noise", "pos_err")}  # fmt: skip
    return {"model": pipe.name, "seeds": seeds, "ar_steps": ar_steps, "sampler": sampler, "steps": steps,
            "score_per_step": per_step, "truth_score_per_step": truth_step, "collapsed_per_step": collapsed,
            "score": float(np.mean(per_step)), "truth_score": float(np.mean(truth_step)), "parts": parts,
            **({"videos": kept} if keep_videos else {})}  # fmt: skip
