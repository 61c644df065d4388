"""Checkpoint loading: official state dicts (nested, prefixed), strict errors, our safetensors directory."""

from __future__ import annotations

import json

import pytest
import torch

from ca2vdm.server.model.checkpoint import (
    CheckpointError,
    load_state_dict_strict,
    read_model_dir,
    read_official_checkpoint,
    save_model_dir,
)
from ca2vdm.server.model.config import ModelConfig, PipelineConfig
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.model.stdit import CausalSTDiT


@pytest.fixture(scope="module")
def reference_sd(reference_dir):
    return torch.load(reference_dir / "tiny_reference_state_dict.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_model_config(reference_config):
    return ModelConfig.from_reference_kwargs(reference_config["config"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "step": torch.tensor(3)},
        lambda sd: {"ema": sd, "model": {k: v * 0 for k, v in sd.items()}},  # EMA weights win
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    ],
)
def test_official_checkpoint_layouts_load(tmp_path, reference_sd, reference_model_config, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(reference_sd), path)
    model = CausalSTDiT(reference_model_config)
    load_state_dict_strict(model, read_official_checkpoint(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference_sd[k]), k


def test_strict_loading_lists_every_problem(reference_sd, reference_model_config):
    bad = dict(reference_sd)
    del bad["blocks.1.attn_cf.qkv.weight"]
    bad["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    bad["final_layer.linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(CausalSTDiT(reference_model_config), bad)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.attn_cf.qkv.weight" in msg
    assert "unexpected keys (1): blocks.9.attn.qkv.weight" in msg
    assert "final_layer.linear.bias: checkpoint (3,)" in msg


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_official_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_official_checkpoint(garbage)
    no_tensors = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_official_checkpoint(no_tensors)


def test_model_dir_round_trip(tmp_path):
    config = PipelineConfig(
        model=ModelConfig(input_size=(8, 8, 8), hidden_size=32, depth=2, num_heads=2, in_channels=3),
        codec="pixel",
        fps=12,
        default_steps=10,
        schedules=[("dpm++2m", 4), ["ddim", 10]],  # the default again: listed once
    )
    model = CausalSTDiT(config.model).randomize_(5)
    save_model_dir(tmp_path / "m", config, model)
    loaded_config, sd = read_model_dir(tmp_path / "m")
    assert loaded_config == config  # the schedules round-trip through JSON lists
    assert config.recommended_schedules() == [{"sampler": "ddim", "steps": 10}, {"sampler": "dpm++2m", "steps": 4}]
    for bad in ([("euler", 4)], [("ddim", 0)]):
        with pytest.raises(ValueError, match="schedule"):
            PipelineConfig(schedules=bad)
    pipe = load_pipeline(str(tmp_path / "m"), device="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    assert pipe.frame_size == (8, 8) and pipe.config.fps == 12


def test_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        read_model_dir(tmp_path)
    config = PipelineConfig(
        model=ModelConfig(input_size=(8, 8, 8), hidden_size=32, depth=1, num_heads=2), codec="pixel"
    )
    save_model_dir(tmp_path / "m", config, CausalSTDiT(config.model))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_model_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model": {}, "colour": "red"}))
    with pytest.raises(CheckpointError, match="colour"):
        read_model_dir(tmp_path / "m")


def test_loader_spec_errors(tmp_path, reference_sd):
    with pytest.raises(FileNotFoundError):
        load_pipeline(str(tmp_path / "nope"), device="cpu")
    ckpt = tmp_path / "ref.pt"
    torch.save(reference_sd, ckpt)
    with pytest.raises(ValueError, match="--preset"):
        load_pipeline(str(ckpt), device="cpu")
    with pytest.raises(CheckpointError, match="shape mismatches"):  # tiny reference weights are not XL/2's
        load_pipeline(str(ckpt), preset="tiny", device="cpu")
    with pytest.raises(ValueError, match="unknown preset"):
        load_pipeline("random:XXL", device="cpu")


def test_reference_config_translation():
    cfg = ModelConfig.from_reference_kwargs(
        {
            "cross_frame_attn": "prev_prefix_3",
            "relative_tpe_mode": "cyclic",
            "enable_flashattn": True,
            "temporal_max_len": 33,
        }
    )
    assert cfg.prefix_frames == 3 and cfg.max_tpe_len == 33
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_reference_kwargs({"relative_tpe_mode": "rope"})
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_reference_kwargs({"hidden_sise": 3})
