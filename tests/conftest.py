"""Run Triton kernels in the interpreter on machines without a GPU (must be set before triton imports)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny pixel-space model with random weights (CPU), shared by server-level tests."""
    from server.model.loader import load_pipeline

    return load_pipeline("random:tiny", device="cpu")
