"""Packaging a trained model with its card: files, card contents, the size budget, and that it serves."""

from __future__ import annotations

import json

import pytest
import torch

from ca2vdm.server.cli import main
from ca2vdm.server.model.config import ModelConfig, PipelineConfig
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.train.evaluate import evaluate
from ca2vdm.server.train.package import CARD_FILE, package
from ca2vdm.server.train.sprites import SpritesConfig, SpritesDataset
from ca2vdm.server.train.trainer import TrainConfig, Trainer

PIPE = PipelineConfig(model=ModelConfig(input_size=(8, 16, 16), in_channels=3, hidden_size=32, depth=1, num_heads=2),
                      codec="pixel")  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data = SpritesDataset(SpritesConfig(height=16, width=16, num_frames=33), length=64)
    trainer = Trainer(PIPE, TrainConfig(steps=4, batch_size=2, log_every=2, ckpt_every=4), data, out)
    trainer.train()
    pipe = load_pipeline(str(out / "model"), device="cpu")
    result = evaluate(pipe, seeds=[3], ar_steps=2, steps=2)
    rand = dict(result, score_per_step=[0.0, 0.0], score=0.0)
    (out / "eval.json").write_text(json.dumps(result))
    (out / "random.json").write_text(json.dumps(rand))
    return out, result, rand


def test_package_writes_weights_config_and_card(trained, tmp_path):
    run, result, rand = trained
    runs = [{"command": "ca2vdm train --preset x --steps 4", "steps": 4, "minutes": 0.1,
             "history": json.loads((run / "history.json").read_text())}]  # fmt: skip
    out = package(run / "model", tmp_path / "default", runs=runs, data="sprites", card="a CPU", trained=result,
                  random=rand)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", CARD_FILE])
    card = (out / CARD_FILE).read_text()
    for needle in ("ca2vdm train --preset x --steps 4", "4 steps in 0.1 min", "card: a CPU", "16×16 RGB",
                   "| 2 | 9–16 |", "ground truth", "random weights", "epsilon-MSE"):  # fmt: skip
        assert needle in card, needle
    pipe = load_pipeline(str(out), device="cpu")  # servable as is
    for name, value in load_pipeline(str(run / "model"), device="cpu").model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[name], value)


def test_package_refuses_weights_over_budget(trained, tmp_path):
    run, result, _ = trained
    with pytest.raises(ValueError, match="over the"):
        package(run / "model", tmp_path / "x", runs=[{"command": "c", "steps": 1, "minutes": 1}], data="d",
                card="c", trained=result, max_bytes=1000)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_package_cli(trained, tmp_path):
    run, _, _ = trained
    runs = [{"command": "ca2vdm train ...", "steps": 4, "minutes": 0.1, "history_file": str(run / "history.json")}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "sheet.png").write_bytes(b"png")
    rc = main(["package", str(run / "model"), "--runs", str(tmp_path / "runs.json"), "--eval", str(run / "eval.json"),
               "--random-eval", str(run / "random.json"), "--card", "CPU", "--out", str(tmp_path / "pkg"),
               "--sheet", str(tmp_path / "sheet.png"), "--limitations", "Sprites fade after 3 AR steps."])  # fmt: skip
    assert rc == 0 and (tmp_path / "pkg" / "samples.png").read_bytes() == b"png"
    card = (tmp_path / "pkg" / CARD_FILE).read_text()
    assert "](samples.png)" in card and "## Limitations\nSprites fade after 3 AR steps." in card


def test_card_summarises_a_long_evaluation_per_10_ar_steps(trained, tmp_path):
    run, result, _ = trained
    long = dict(result, ar_steps=25, score_per_step=[0.5] * 10 + [0.25] * 10 + [0.0] * 5,
                collapsed_per_step=[0.0] * 20 + [1.0] * 5, score=0.3)  # fmt: skip
    out = package(run / "model", tmp_path / "p", runs=[{"command": "c", "steps": 1, "minutes": 1}], data="d",
                  card="c", trained=result, long=long)  # fmt: skip
    card = (out / CARD_FILE).read_text()
    rows = ("| 1–10 | 0–10 | 0.500 | 0.00 |", "| 11–20 | 10–20 | 0.250 | 0.00 |", "| 21–25 | 20–25 | 0.000 | 1.00 |")
    for row in rows:
        assert row in card, card
    assert "### 25 AR steps (25 s)" in card and "mean 0.300" in card
