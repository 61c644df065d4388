"""Test images: smooth (so codecs reproduce them closely), seeded, never constant."""

from __future__ import annotations

import numpy as np
import torch


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(h, w, 3) uint8 of smooth gradients with a seeded phase."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + g.uniform(0, 6)), np.cos(5 * y + g.uniform(0, 6)), x * y], -1)
    return torch.from_numpy(((img + 1) / 2 * 255).clip(0, 255).astype(np.uint8))
