"""Resolve a model spec to a ready pipeline (network + latent codec + run settings).

Specs (DESIGN.md): a directory (`config.json` + `model.safetensors` [+ `vae/`]), an official `.pt`/`.pth`
checkpoint with a preset, or `random:PRESET`. Text-conditioned models also get their prompt encoder: a local T5
directory (`text_encoder`), or a random one for `random:` specs. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ca2vdm.kernels.fp8 import quantize_model_

from .checkpoint import load_state_dict_strict, read_model_dir, read_official_checkpoint
from .codecs import LatentCodec, make_codec
from .config import PipelineConfig, get_preset
from .devices import resolve_device
from .diffusion import DEFAULT_STEPS, Sampler, make_sampler
from .stdit import CausalSTDiT
from .text import DEFAULT_CACHE_SIZE, TextEncoder, random_text_encoder, tiny_text_encoder

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / "default"


@dataclass
class Pipeline:
    name: str
    config: PipelineConfig
    model: CausalSTDiT
    codec: LatentCodec
    device: torch.device
    text: TextEncoder | None = None  # the prompt encoder of a text-conditioned model (config.takes_text)

    def sampler(self, name: str, steps: int) -> Sampler:
        """A sampler for this model: pixel-space models sample with the x0 estimate clamped to the data range."""
        return make_sampler(name, steps, clip_x0=self.codec.name == "pixel")

    def default_steps(self, sampler: str) -> int:
        """Steps a request that names no count gets: the model's own for its default sampler, else the sampler's."""
        return self.config.default_steps if sampler == self.config.default_sampler else DEFAULT_STEPS[sampler]

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of output video frames."""
        h, w = self.config.model.input_size[1:]
        return h * self.codec.downsample, w * self.codec.downsample


def default_dtype(device: torch.device, config: PipelineConfig) -> torch.dtype:
    """bf16 on CUDA, except pixel-space models: their epsilon must resolve x0 * sqrt(alpha_bar) ~ 0.006 near
    t = T, below bf16's resolution (and they are small); fp32 on the CPU."""
    if device.type != "cuda" or config.codec == "pixel":
        return torch.float32
    return torch.bfloat16


def _check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        return
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"--precision fp8 needs float8 tensor cores (compute capability 8.9+): "
                         f"{torch.cuda.get_device_name(device)} has none")  # fmt: skip
    if dtype != torch.bfloat16:
        raise ValueError(f"--precision fp8 serves bf16 models; this one runs in {dtype} on GPUs (pixel-space "
                         "models keep fp32 for precision)")  # fmt: skip


def load_pipeline(
    spec: str | None,
    *,
    preset: str | None = None,
    vae: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    precision: str = "auto",
    text_encoder: str | None = None,
    text_device: str = "auto",
    text_cache_size: int = DEFAULT_CACHE_SIZE,
) -> Pipeline:
    """Build the pipeline for `spec` on `device` (bf16 on CUDA, fp32 on CPU unless `dtype` is given).

    `precision` "fp8": the block linears run in float8 e4m3 (kernels/fp8.py), on GPUs with float8 tensor cores
    (compute capability 8.9+) and bf16 models, or on the CPU (slow; for tests). "auto"/"bf16": the model dtype.

    Text-conditioned models (`config.takes_text`) need `text_encoder`, a local T5 directory (transformers' T5
    encoder and tokenizer; its hidden size must be the model's caption_channels), except `random:` specs, which
    get a random encoder (`random:tiny-text` the tiny one, others one of T5 v1.1 XXL's shape). It runs on
    `text_device` ("auto": the pipeline's device), bf16 on CUDA and fp32 on the CPU, and keeps the features of the
    last `text_cache_size` prompts (LRU).
    """
    if precision not in ("auto", "bf16", "fp8"):
        raise ValueError(f"unknown precision {precision!r}: auto, bf16 or fp8")
    dev = resolve_device(device)
    if spec in ("", "default"):  # the packaged model by name (how /v1/models and the logs call it)
        spec = None
    name = spec or "default"  # what /v1/models and the logs call it
    if spec is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                "no packaged default model is installed in this build; pass --model DIR, "
                "--model CHECKPOINT.pt --preset NAME, or --model random:PRESET"
            )
        spec = str(DEFAULT_MODEL_DIR)

    if spec.startswith("random:"):
        config = get_preset(spec.split(":", 1)[1])
        _check_text_args(name, config, text_encoder, random=True)
        # std 0.3/sqrt(fan_in): a deep random network at 1/sqrt(fan_in) is chaotic (its latents explode and
        # attention saturates, amplifying float rounding 100x per chunk); 0.3 keeps runs numerically tame
        model = CausalSTDiT(config.model).randomize_(seed, std_scale=0.3)
        codec = make_codec("pixel" if config.codec == "pixel" else "sd-vae-random")
    else:
        path = Path(spec)
        if path.is_dir():
            config, state_dict = read_model_dir(path)
            _check_text_args(name, config, text_encoder, random=False)
            vae_dir = path / "vae"
        elif path.suffix in (".pt", ".pth"):
            if preset is None:
                raise ValueError(f"{path.name} is a reference checkpoint: also pass --preset (XL/2, B/2, tiny)")
            config = get_preset(preset)
            _check_text_args(name, config, text_encoder, random=False)
            state_dict = read_official_checkpoint(path)
            vae_dir = path.parent / "vae"
        elif not path.exists():
            raise FileNotFoundError(f"model not found: {spec}")
        else:
            raise ValueError(f"cannot load model {spec!r}: expected a directory, a .pt/.pth file or random:PRESET")
        model = CausalSTDiT(config.model)
        load_state_dict_strict(model, state_dict)
        if config.codec == "pixel":
            codec = make_codec("pixel")
        else:
            vae_path = Path(vae) if vae else vae_dir
            if not vae_path.is_dir():
                raise FileNotFoundError(
                    f"model {spec} needs an SD-VAE directory (diffusers layout): pass --vae DIR or put it at {vae_dir}"
                )
            codec = make_codec("sd-vae", str(vae_path))

    dtype = dtype or default_dtype(dev, config)
    model = model.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    if precision == "fp8":
        _check_fp8(dev, dtype)
        quantize_model_(model)
    codec = codec.to(dev, dtype)
    text = None
    if config.takes_text:
        text_dev = dev if text_device == "auto" else resolve_device(text_device)
        text = _load_text_encoder(name, spec, config, text_encoder, text_dev, seed, text_cache_size)
    return Pipeline(name=name, config=config, model=model, codec=codec, device=dev, text=text)


def _check_text_args(name: str, config: PipelineConfig, text_encoder: str | None, random: bool) -> None:
    """Refuse, before any weights load, a text encoder for a model that takes no text, a text model without one
    (random specs bring their own), and a T5 directory whose config.json gives another hidden size."""
    if text_encoder and not config.takes_text:
        raise ValueError(f"model {name} takes no text prompt: --text-encoder is only for text-conditioned models")
    if config.takes_text and not text_encoder and not random:
        raise ValueError(f"model {name} is text-conditioned: pass --text-encoder DIR (a local T5 v1.1 XXL: "
                         "transformers' T5 encoder and its tokenizer)")  # fmt: skip
    if text_encoder:
        try:
            hidden = json.loads((Path(text_encoder) / "config.json").read_text()).get("d_model")
        except (OSError, ValueError, AttributeError):
            return  # TextEncoder.from_dir says what is wrong with the directory
        _check_caption_channels(name, config, text_encoder, hidden)


def _check_caption_channels(name: str, config: PipelineConfig, text_encoder: str, hidden: object) -> None:
    channels = config.model.caption_channels
    if hidden is not None and hidden != channels:
        raise ValueError(f"text encoder {text_encoder} has hidden size {hidden}, but model {name} takes "
                         f"{channels}-channel captions (T5 v1.1 XXL: 4096)")  # fmt: skip


def _load_text_encoder(
    name: str,
    spec: str,
    config: PipelineConfig,
    text_encoder: str | None,
    device: torch.device,
    seed: int,
    cache_size: int,
) -> TextEncoder:
    channels, max_length = config.model.caption_channels, config.model.model_max_length
    if text_encoder:
        text = TextEncoder.from_dir(text_encoder, max_length=max_length, device=device, cache_size=cache_size)
        _check_caption_channels(name, config, text_encoder, text.caption_channels)
        return text
    if spec == "random:tiny-text":
        return tiny_text_encoder(channels, max_length, seed=seed, device=device, cache_size=cache_size)
    return random_text_encoder(channels, max_length, device=device, seed=seed, cache_size=cache_size)
