"""Checkpoints: official reference state dicts (.pt/.pth) and our own `config.json` + `model.safetensors`.

Loading is always strict: a missing, unexpected or mis-shaped tensor is an error that lists the names,
because a partially loaded diffusion model still produces video — just the wrong video.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import PipelineConfig
from .stdit import CausalSTDiT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_NESTING_KEYS = ("ema", "model", "state_dict", "module")  # preference order when a checkpoint nests weights
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{shown}{more}"


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint object (nested under ema/model/state_dict/module, with or
    without a DistributedDataParallel `module.` prefix)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {_listing(sorted(obj))})")
        obj = nested
    else:
        raise CheckpointError("checkpoint nests its state dict too deeply")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy every tensor into `model`; raise CheckpointError listing missing/unexpected/mis-shaped names."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a reference/Open-Sora `.pt`/`.pth` file (tensors only: no arbitrary pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-tensor pickles
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return unwrap_state_dict(obj)


def save_model_dir(path: str | Path, config: PipelineConfig, model: CausalSTDiT) -> None:
    """Write `config.json` + `model.safetensors` (float tensors kept in their dtype)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "ca2vdm"})
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def read_model_dir(path: str | Path) -> tuple[PipelineConfig, dict[str, Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = PipelineConfig.from_dict(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid {cfg_file}: {exc}") from exc
    try:
        state_dict = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    return config, state_dict
