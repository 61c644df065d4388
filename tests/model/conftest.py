from __future__ import annotations

import json
from pathlib import Path

import pytest

# ../shared/reference beside the checkout (CI lays shared/ next to the clone, like a developer checkout).
REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "tiny_reference_vectors.pt").is_file():
        pytest.fail(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_config(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "tiny_reference_config.json").read_text())
