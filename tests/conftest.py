"""Run Triton kernels in the interpreter on machines without a GPU (must be set before triton imports)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny pixel-space model with random weights in fp32, shared by server-level tests; on the CPU, or on the
    device named by CA2VDM_TEST_DEVICE (the GPU variants of the server and reliability suites)."""
    from ca2vdm.server.model.loader import load_pipeline

    return load_pipeline("random:tiny", device=os.environ.get("CA2VDM_TEST_DEVICE", "cpu"), dtype=torch.float32)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the repository's tracked files (built from a copy: the build writes into its source tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("tests/", "bench/", "docs/")):
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(tmp / "src")], check=True)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("ca2vdm-*.whl")
    return wheel
