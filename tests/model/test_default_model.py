"""The packaged default model (server/weights/default): inside the wheel, within its size budget, documented, and it
continues the sprites it was trained on where random weights of the same shape give noise."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from server.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from server.model.loader import DEFAULT_MODEL_DIR, load_pipeline
from server.train.evaluate import evaluate
from server.train.package import CARD_FILE, MAX_WEIGHT_BYTES, SHEET_FILE

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_model_is_within_budget_and_documented():
    assert (DEFAULT_MODEL_DIR / WEIGHTS_FILE).stat().st_size <= MAX_WEIGHT_BYTES
    card = (DEFAULT_MODEL_DIR / CARD_FILE).read_text()
    for needle in ("## Training", "scripts/train_default_model.sh", "## Limitations", "## Evaluation", "random weights",
                   f"]({SHEET_FILE})"):  # fmt: skip
        assert needle in card, needle
    assert (DEFAULT_MODEL_DIR / SHEET_FILE).stat().st_size > 0


def test_no_model_given_means_the_default_model():
    pipe = load_pipeline(None, device="cpu")
    assert pipe.name == "default" and pipe.frame_size == (32, 32)
    assert (pipe.config.default_sampler, pipe.config.default_steps, pipe.config.prefix_perturb_t) == ("ddim", 10, 100)


def test_the_default_model_continues_sprites_where_random_weights_do_not():
    # two AR steps (16 frames) from the first frame of unseen sprite videos, scored by the tracking metric
    seeds = [20000, 20001, 20002]
    trained = evaluate(load_pipeline(None, device="cpu"), seeds=seeds, ar_steps=2, steps=10)
    random = evaluate(load_pipeline("random:small", device="cpu"), seeds=seeds, ar_steps=2, steps=10)
    assert trained["score"] >= 0.4, trained["score_per_step"]
    assert random["score"] <= 0.05, random["score_per_step"]


def test_the_wheel_carries_the_default_model(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("server", "kernels", "client"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ca2vdm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, SHEET_FILE):
        assert f"server/weights/default/{name}" in names, name
