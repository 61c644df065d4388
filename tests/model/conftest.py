from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Golden data from the official implementation, kept in the repository (tests/data/reference/README.md).
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "tiny_reference_vectors.pt").is_file():
        pytest.fail(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_config(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "tiny_reference_config.json").read_text())


# A tiny randomly initialised diffusers AutoencoderKL (downsample 2, 4 latent channels) for SD-VAE paths.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY_VAE_CONFIG)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return path
