"""Device names as users give them ("auto", "cpu", "cuda", "cuda:1") to torch devices, with a clear error where
CUDA is asked for and missing."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device, what: str = "--device cuda was requested") -> torch.device:
    """ "auto": CUDA when available, else the CPU. `what` opens the error for a CUDA device that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} but no CUDA device is available")
    return dev
