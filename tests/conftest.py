"""Run Triton kernels in the interpreter on machines without a GPU (must be set before triton imports)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny pixel-space model with random weights in fp32, shared by server-level tests; on the CPU, or on the
    device named by CA2VDM_TEST_DEVICE (the GPU variants of the server and reliability suites)."""
    from server.model.loader import load_pipeline

    return load_pipeline("random:tiny", device=os.environ.get("CA2VDM_TEST_DEVICE", "cpu"), dtype=torch.float32)
