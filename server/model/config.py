"""Model configuration: the CausalSTDiT2 hyper-parameters and named presets.

`ModelConfig` holds what shapes the network (and so the checkpoint); `PipelineConfig` adds what a
generation run needs around it (latent codec, chunk length, cache length, fps). Both are frozen and
validated on construction, and both round-trip through the `config.json` of a model directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of CausalSTDiT2 (names follow the reference constructor where they exist)."""

    input_size: tuple[int, int, int] = (16, 32, 32)  # (T, H, W) of the latent; only H, W matter at inference
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pred_sigma: bool = True  # learned variance: the model outputs 2 * in_channels
    caption_channels: int = 0  # 0: no text cross-attention (the video-prediction setting)
    model_max_length: int = 120
    temp_extra_in_channels: int = 1  # the "is conditional" mask channel merged before block 0's temporal attn
    max_tpe_len: int = 33  # temporal position embedding length; indices wrap cyclically past it
    prefix_frames: int = 3  # prefix-enhanced spatial attention over the last N conditional frames (0: off)
    space_scale: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        if len(self.input_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("input_size and patch_size must have 3 entries (T, H, W)")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patching is not supported: autoregression needs patch_size[0] == 1")
        if self.input_size[1] % self.patch_size[1] or self.input_size[2] % self.patch_size[2]:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 (2-D sin-cos position embedding)")
        for name in ("in_channels", "depth", "max_tpe_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefix_frames < 0 or self.temp_extra_in_channels < 0 or self.caption_channels < 0:
            raise ValueError("prefix_frames, temp_extra_in_channels and caption_channels must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (h, w) of one frame."""
        return self.input_size[1] // self.patch_size[1], self.input_size[2] // self.patch_size[2]

    @property
    def num_spatial(self) -> int:
        h, w = self.grid_size
        return h * w

    @classmethod
    def from_reference_kwargs(cls, kwargs: dict[str, Any]) -> ModelConfig:
        """Translate the reference `CausalSTDiT2(**kwargs)` constructor arguments.

        Only the inference-relevant, supported settings are accepted: cyclic TPE, causal temporal
        attention and `prev_frames_N` / `prev_prefix_N` prefix attention. Anything else raises, so an
        unsupported official config never loads silently into a different function.
        """
        kw = dict(kwargs)
        mode = kw.pop("relative_tpe_mode", "cyclic")
        if mode != "cyclic":
            raise ValueError(f"relative_tpe_mode={mode!r} is not supported (only 'cyclic')")
        if kw.pop("is_causal", True) is not True:
            raise ValueError("only is_causal=True is supported")
        if kw.pop("temp_extra_in_all_block", False):
            raise ValueError("temp_extra_in_all_block=True is not supported")
        enhance = kw.pop("spatial_attn_enhance", None)
        cross_frame = kw.pop("cross_frame_attn", None)
        if enhance is None and cross_frame is not None:
            enhance = cross_frame.replace("prev_prefix_", "prev_frames_")
        if enhance is None:
            prefix_frames = 0
        elif enhance.startswith("prev_frames_"):
            prefix_frames = int(enhance.rsplit("_", 1)[-1])
        else:
            raise ValueError(f"spatial_attn_enhance={enhance!r} is not supported")
        if "temporal_max_len" in kw and kw["temporal_max_len"] is not None:
            kw["max_tpe_len"] = kw.pop("temporal_max_len")
        for ignored in (
            "enable_flashattn",
            "enable_layernorm_kernel",
            "enable_sequence_parallelism",
            "freeze",
            "drop_path",
            "class_dropout_prob",
            "no_temporal_pos_emb",
            "temporal_max_len",
            "from_pretrained",
            "from_scratch",
        ):
            kw.pop(ignored, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise ValueError(f"unknown reference model arguments: {unknown}")
        return cls(prefix_frames=prefix_frames, **kw)


@dataclass(frozen=True)
class PipelineConfig:
    """A servable model: the network plus how it is run autoregressively."""

    model: ModelConfig = field(default_factory=ModelConfig)
    codec: str = "sd-vae"  # "pixel" or "sd-vae" (diffusers AutoencoderKL in `vae/`)
    fps: int = 8
    chunk_frames: int = 8  # frames denoised per autoregression step
    max_cache_frames: int = 25  # P_max: conditional frames kept in the cache queue
    prefix_perturb_t: int = 50  # noise level (of 1000) added to frames before they are cached; 0: off
    default_sampler: str = "ddim"
    default_steps: int = 25
    # other (sampler, steps) schedules the model is known to do well with, best first (e.g. a few-step solver)
    schedules: tuple[tuple[str, int], ...] = ()
    # text-conditioned models (model.caption_channels > 0): classifier-free guidance scale a request that names
    # none gets (1.0: no guidance, the unconditional branch is not run)
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        object.__setattr__(self, "schedules", tuple((str(s), int(n)) for s, n in self.schedules))
        from .diffusion import SAMPLERS

        for sampler, steps in ((self.default_sampler, self.default_steps), *self.schedules):
            if sampler not in SAMPLERS or steps < 1:
                raise ValueError(f"schedule {sampler!r} x {steps}: sampler must be one of {SAMPLERS}, steps >= 1")
        if self.codec not in ("pixel", "sd-vae"):
            raise ValueError(f"codec must be 'pixel' or 'sd-vae', not {self.codec!r}")
        if not 1 <= self.chunk_frames <= self.max_cache_frames:
            raise ValueError("need 1 <= chunk_frames <= max_cache_frames")
        if self.chunk_frames > self.model.max_tpe_len:
            raise ValueError("chunk_frames must not exceed max_tpe_len")
        if self.fps < 1 or not 0 <= self.prefix_perturb_t < 1000:
            raise ValueError("fps must be >= 1 and prefix_perturb_t in [0, 1000)")
        if not 1.0 <= self.guidance_scale <= 50.0:
            raise ValueError("guidance_scale must be in [1, 50]")

    @property
    def takes_text(self) -> bool:
        """Whether the model is conditioned on a text prompt (cross-attention to caption features)."""
        return self.model.caption_channels > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recommended_schedules(self) -> list[dict[str, Any]]:
        """The default schedule, then the others: what /v1/models offers as {"sampler", "steps"}."""
        pairs = [(self.default_sampler, self.default_steps), *self.schedules]
        unique = list(dict.fromkeys(pairs))
        return [{"sampler": s, "steps": n} for s, n in unique]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown keys in config.json: {unknown}")
        model = ModelConfig(**data.pop("model", {}))
        return cls(model=model, **data)


# Named presets. XL/2 and B/2 are the paper's video-prediction models (256x256 video through the SD-VAE,
# 32x32 latents); XL/2-text is the text-conditioned XL/2 (T5 v1.1 XXL features: 4096 channels, 120 tokens);
# `small` is the packaged default model's shape (32x32 RGB pixels, 4x4 patches, 4.8 M parameters: streams in real
# time on two CPU cores); `tiny` is a pixel-space model small enough for CPU tests, `tiny-text` the same with text
# cross-attention (32-channel caption features, 8 tokens: a tiny T5 encoder's).
PRESETS: dict[str, PipelineConfig] = {
    "XL/2": PipelineConfig(model=ModelConfig(depth=28)),
    "XL/2-text": PipelineConfig(model=ModelConfig(depth=28, caption_channels=4096, model_max_length=120)),
    "B/2": PipelineConfig(model=ModelConfig(depth=14)),
    "small": PipelineConfig(
        model=ModelConfig(
            input_size=(8, 32, 32), in_channels=3, patch_size=(1, 4, 4), hidden_size=192, depth=6, num_heads=3
        ),
        codec="pixel",
        default_steps=10,
    ),
    "tiny": PipelineConfig(
        model=ModelConfig(input_size=(8, 16, 16), in_channels=3, hidden_size=64, depth=2, num_heads=2),
        codec="pixel",
    ),
    "tiny-text": PipelineConfig(
        model=ModelConfig(
            input_size=(8, 16, 16),
            in_channels=3,
            hidden_size=64,
            depth=2,
            num_heads=2,
            caption_channels=32,
            model_max_length=8,
        ),  # fmt: skip
        codec="pixel",
        guidance_scale=3.0,
    ),
}


def get_preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
