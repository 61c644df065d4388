"""Run Triton kernels in the interpreter on machines without a GPU (must be set before triton imports)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
