"""Imperfect context for training: the remedies for exposure bias that `ca2vdm train` can mix into its batches.

At inference the model conditions on frames it generated itself. Trained only on ground-truth prefixes, it meets
a slightly faded, slightly blurred chunk and continues it fainter still, until the sprites are gone
(docs/training.md, "Why the video faded"). Two ways to show the model such context during training, each with the
ground-truth continuation as the target, so it learns to restore what its context lost:

- `degrade_prefix`: synthetic degradation of the true prefix: the sprites blurred and faded towards the
  background, more strongly in the later frames (as a free-running generation fades). Cheap, and the
  true continuation stays consistent with the degraded frames' layout.
- `rollout_prefix`: the model's own continuation. From the first 1 + l true frames of the window, the
  (EMA) model generates the remaining prefix chunks through the inference path itself (cache, prefix
  perturbation, sampler), without gradients. The errors are exactly the model's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ca2vdm.server.model.cache import DenseKVCache
from ca2vdm.server.model.diffusion import Sampler
from ca2vdm.server.model.generate import perturb_for_cache
from ca2vdm.server.model.stdit import CausalSTDiT

__all__ = ["degrade_prefix", "rollout_prefix"]

_BLUR = torch.tensor([1.0, 2.0, 1.0]) / 4.0  # separable 3x3 binomial blur (sigma ~0.7 px)


def _blur(x: Tensor) -> Tensor:
    """3x3 binomial blur of (B, C, T, H, W) over H and W, edges replicated."""
    b, c, t, h, w = x.shape
    flat = x.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    k = _BLUR.to(x.device, x.dtype)
    flat = F.conv2d(F.pad(flat, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
    flat = F.conv2d(F.pad(flat, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
    return flat.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def degrade_prefix(prefix: Tensor, background: Tensor, apply: Tensor, gen: torch.Generator,
                   min_contrast: float = 0.35) -> Tensor:  # fmt: skip
    """Blur and fade the sprites of prefix frames (B, C, P, H, W) towards their backgrounds (B, C, H, W), where
    `apply` (B,) bool says so; other samples come back unchanged.

    Per sample: the difference from the background is blurred with weight beta ~ U(0, 1), then scaled by a
    contrast that falls linearly over the frames from alpha_old (oldest) to alpha_new (newest), alpha_new ~
    U(min_contrast, 1) and alpha_old ~ U(alpha_new, 1). Random draws come from `gen` on the prefix's device.
    """
    b, _, p = prefix.shape[:3]
    dev = prefix.device
    if background.shape != (b, prefix.shape[1], *prefix.shape[3:]):
        raise ValueError(f"background {tuple(background.shape)} does not match prefix {tuple(prefix.shape)}")
    u = torch.rand(b, 3, generator=gen, device=dev)
    beta = u[:, 0].view(b, 1, 1, 1, 1)
    a_new = min_contrast + (1.0 - min_contrast) * u[:, 1]
    a_old = a_new + (1.0 - a_new) * u[:, 2]
    ramp = torch.linspace(0.0, 1.0, p, device=dev) if p > 1 else torch.ones(1, device=dev)
    alpha = (a_old[:, None] + (a_new - a_old)[:, None] * ramp[None]).view(b, 1, p, 1, 1)
    bg = background[:, :, None]
    diff = prefix - bg
    diff = diff + beta * (_blur(diff) - diff)
    degraded = bg + alpha * diff
    return torch.where(apply.view(b, 1, 1, 1, 1).to(dev), degraded, prefix)


@torch.no_grad()
def rollout_prefix(model: CausalSTDiT, window: Tensor, head: int, prefix: int, chunk: int, sampler: Sampler,
                   prefix_perturb_t: int, gen: torch.Generator, bf16: bool = False) -> Tensor:  # fmt: skip
    """The prefix (B, C, `prefix`, H, W) whose first `head` frames are the window's (B, C, >= prefix, H, W) true
    ones and whose remaining frames the model generated, `chunk` frames at a time, exactly as inference does:
    the true frames and every generated chunk are perturbed to `prefix_perturb_t` and written into a dense
    cache, and each chunk is sampled against it from noise. The model should be the EMA copy in eval mode.
    `bf16` runs the forwards under bf16 autocast, as training runs its own (patch embedding and output layer
    stay fp32; the cache keeps fp32 and attention casts)."""
    if (prefix - head) % chunk or not 0 < head <= prefix <= window.shape[2]:
        raise ValueError(f"prefix {prefix} must be head {head} plus whole chunks of {chunk} within the window")
    dev = window.device
    sampler = sampler.to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return _rollout(model, window, head, prefix, chunk, sampler, prefix_perturb_t, gen)


def _rollout(model: CausalSTDiT, window: Tensor, head: int, prefix: int, chunk: int, sampler: Sampler,
             prefix_perturb_t: int, gen: torch.Generator) -> Tensor:  # fmt: skip
    b, c, _, h, w = window.shape
    dev = window.device
    cache = DenseKVCache.for_model(model, batch_size=b, max_frames=prefix)
    frames = [window[:, :, :head].float()]
    model.write(cache, perturb_for_cache(frames[0], sampler, prefix_perturb_t, gen))
    made = head
    while made < prefix:
        noise = torch.randn((b, c, chunk, h, w), generator=gen, device=dev)
        out = sampler.sample_loop(lambda x, t: model.denoise(cache, x, t).float(), noise, generator=gen)
        frames.append(out)
        made += chunk
        if made < prefix:
            model.write(cache, perturb_for_cache(out, sampler, prefix_perturb_t, gen))
    return torch.cat(frames, dim=2).to(window.dtype)
