"""Latent codecs: map RGB video frames to the latent space the diffusion model works in, and back.

The model never sees pixels directly; it sees whatever a codec produces. Two codecs exist:

* ``PixelCodec``: identity, for tiny test/benchmark models that diffuse directly in pixel space.
* ``SDVAECodec``: the Stable Diffusion image VAE applied frame by frame, as Open-Sora v1.0 / Ca2-VDM do.

``diffusers`` is only needed for the SD-VAE and is imported lazily (``pip install ca2vdm[vae]``).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "SD_VAE_SCALING_FACTOR",
    "LatentCodec",
    "PixelCodec",
    "SDVAECodec",
    "frames_to_uint8",
    "uint8_to_frames",
    "make_codec",
    "CODEC_NAMES",
]

#: Latent scale of the SD 1.x VAE; Open-Sora v1.0 and Ca2-VDM hard-code it (not read from the VAE config).
SD_VAE_SCALING_FACTOR = 0.18215

#: Names accepted by ``make_codec``.
CODEC_NAMES = ("pixel", "sd-vae", "sd-vae-random")

#: Architecture of stabilityai/sd-vae-ft-ema (what Open-Sora v1.0 / Ca2-VDM use), for random-weight builds.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SD_VAE_SCALING_FACTOR,
}

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


def _check_frames(x: Tensor, what: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{what} must be 5-D (B, C, T, H, W), got shape {tuple(x.shape)}")


class LatentCodec(ABC):
    """Contract between pixels and the diffusion model's latent space.

    Attributes:
        name: short identifier ("pixel", "sd-vae").
        latent_channels: C, channels of the latent video.
        downsample: spatial factor f; H and W of the input must be divisible by it.

    ``encode(frames)``: ``frames`` is float in [-1, 1] of shape (B, 3, T, H, W) on any device; returns float32
    latents (B, C, T, H/f, W/f) on the codec's device (PixelCodec has none: the input's device).
    Deterministic: the same frames give the same latents. The result never aliases the input, so callers may
    modify it in place.

    ``decode(latents)``: the inverse; takes (B, C, T, h, w) (any float dtype) and returns float32 frames
    (B, 3, T, h*f, w*f) clamped to [-1, 1] on the codec's device (PixelCodec: the input's device).

    ``to(device, dtype=None)``: moves the codec's weights (if any) and returns ``self``; ``dtype`` is the
    compute dtype, outputs stay float32.

    Codecs run without autograd (``torch.no_grad``). Frames are independent (image codecs): encoding a video
    equals encoding each frame on its own, so chunked/streaming callers may encode frames in any grouping.
    """

    name: str
    latent_channels: int
    downsample: int

    @abstractmethod
    def encode(self, frames: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T, H/f, W/f) float32."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, T, h, w) -> (B, 3, T, h*f, w*f) float32 in [-1, 1]."""

    @abstractmethod
    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LatentCodec:
        """Move weights to ``device`` (and compute ``dtype``); return self."""

    def compile_decoder(self) -> bool:
        """Compile the decode for speed where the codec has a network to compile; whether it did."""
        return False

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a (T, H, W) video, so callers can allocate without encoding."""
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"{self.name}: height and width must be divisible by {self.downsample}, got {height}x{width}"
            )
        return (self.latent_channels, frames, height // self.downsample, width // self.downsample)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, latent_channels={self.latent_channels}, "
            f"downsample={self.downsample})"
        )


class PixelCodec(LatentCodec):
    """Identity codec: the model diffuses RGB pixels directly (tiny test models, benchmarks)."""

    def __init__(self) -> None:
        self.name = "pixel"
        self.latent_channels = 3
        self.downsample = 1

    def encode(self, frames: Tensor) -> Tensor:
        _check_frames(frames, "frames")
        if frames.shape[1] != 3:
            raise ValueError(f"frames must have 3 channels, got shape {tuple(frames.shape)}")
        return frames.to(torch.float32, copy=True)  # (B, 3, T, H, W); copy so callers may edit in place

    def decode(self, latents: Tensor) -> Tensor:
        _check_frames(latents, "latents")
        if latents.shape[1] != 3:
            raise ValueError(f"latents must have 3 channels, got shape {tuple(latents.shape)}")
        return latents.to(torch.float32).clamp(-1.0, 1.0)  # (B, 3, T, H, W); clamp allocates a new tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PixelCodec:
        """No weights: nothing to move (outputs follow the input's device)."""
        return self


def _import_autoencoder_kl() -> type[AutoencoderKL]:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the SD-VAE codec needs diffusers: install ca2vdm[vae] (pip install 'ca2vdm[vae]')") from e
    return AutoencoderKL


def _resolve_vae_dir(path: str | os.PathLike[str]) -> Path:
    """Find the diffusers VAE directory: ``path`` itself, or ``path/vae`` (a model or pipeline directory)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"VAE directory not found: {str(root)!r}")
    if not root.is_dir():
        raise ValueError(f"not a VAE directory (expected a diffusers folder with config.json): {str(root)!r}")
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"not a diffusers VAE directory (no config.json): {str(root)!r}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"not a diffusers VAE directory (unreadable config.json): {str(root)!r}: {e}") from e
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls != "AutoencoderKL":
        raise ValueError(
            f"not a diffusers VAE directory: {str(config_path)!r} describes {cls!r}, expected 'AutoencoderKL'"
        )
    if not any((root / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"VAE directory has no weights ({' / '.join(_WEIGHT_FILES[:2])}): {str(root)!r}")
    return root


class SDVAECodec(LatentCodec):
    """Stable Diffusion image VAE applied per frame, as in Open-Sora v1.0 / Ca2-VDM.

    Latents are ``posterior.mean * 0.18215``. The reference samples the posterior (``latent_dist.sample()``);
    we take the mean so that encoding is deterministic (same image, same latents, reproducible streams); the
    SD VAE's posterior std is small, but latents therefore differ slightly from the reference's. Decoding
    divides by the same factor.

    Frames are folded into the batch, (B, C, T, H, W) -> (B*T, C, H, W), and run ``micro_batch_frames`` at a
    time to bound activation memory (the decoder's full-resolution activations dominate).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        micro_batch_frames: int = 16,
        scaling_factor: float = SD_VAE_SCALING_FACTOR,
    ) -> None:
        if micro_batch_frames < 1:
            raise ValueError(f"micro_batch_frames must be >= 1, got {micro_batch_frames}")
        cfg = vae.config
        if cfg.in_channels != 3 or cfg.out_channels != 3:
            raise ValueError(f"VAE must map 3-channel images, got in={cfg.in_channels} out={cfg.out_channels}")
        self.vae = vae.eval().requires_grad_(False)
        self.name = "sd-vae"
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.micro_batch_frames = int(micro_batch_frames)
        self.scaling_factor = float(scaling_factor)
        self.channels_last = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        micro_batch_frames: int = 16,
        dtype: torch.dtype | None = None,
    ) -> SDVAECodec:
        """Load a local diffusers-layout VAE (``config.json`` + weights); ``path/vae`` is also accepted.

        Never downloads (``local_files_only=True``); a missing directory raises FileNotFoundError and anything
        that is not an AutoencoderKL directory raises ValueError, both naming the path.
        """
        autoencoder_kl = _import_autoencoder_kl()
        root = _resolve_vae_dir(path)
        kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
        vae = autoencoder_kl.from_pretrained(str(root), local_files_only=True, **kwargs)
        return cls(vae, micro_batch_frames=micro_batch_frames)

    @classmethod
    def random(cls, seed: int = 0, micro_batch_frames: int = 16) -> SDVAECodec:
        """SD-VAE architecture (sd-vae-ft-ema config) with random weights: real shapes and cost, noise output.

        For benchmarks and tests only: decoded frames are noise. Leaves the global RNG state alone.
        """
        autoencoder_kl = _import_autoencoder_kl()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = autoencoder_kl(**SD_VAE_CONFIG)
        return cls(vae, micro_batch_frames=micro_batch_frames)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDVAECodec:
        if dtype is None:
            self.vae.to(device)
        else:
            self.vae.to(device=device, dtype=dtype)
        return self

    def set_channels_last(self, enabled: bool) -> None:
        """Run the convolutions channels-last (NHWC). Off by default: on an H200 in bf16 it measured slower than
        NCHW (decode of 128 frames at 256^2: 446 vs 403 ms, bench/results/engine_parts_h200.json)."""
        self.channels_last = enabled
        self.vae.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def compile_decoder(self) -> bool:
        """Compile the decoder with torch.compile (in place: weights and their names stay; each frame count compiles
        once, on its first decode). On an H200 in bf16 at 256^2 it halves the decode (40 frames: 64 vs 129 ms; its
        GroupNorm and SiLU fuse; bench/results/vae_decode_h200.json) after a compile of about 50 s."""
        self.vae.decoder.compile(dynamic=False)
        return True

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()  # not inference_mode: callers edit latents in place, which inference tensors forbid
    def encode(self, frames: Tensor) -> Tensor:
        _check_frames(frames, "frames")
        b, c, t, h, w = frames.shape
        if c != 3:
            raise ValueError(f"frames must have 3 channels, got shape {tuple(frames.shape)}")
        self.latent_shape(t, h, w)  # validates divisibility
        device, dtype = self.device, self.dtype
        flat = frames.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
        outs = []
        for i in range(0, b * t, self.micro_batch_frames):
            x = flat[i : i + self.micro_batch_frames].to(device=device, dtype=dtype)  # (m, 3, H, W)
            mean = self.vae.encode(self._layout(x)).latent_dist.mean  # (m, C, h, w)
            outs.append(mean.float() * self.scaling_factor)
        z = torch.cat(outs, dim=0)  # (B*T, C, h, w)
        hh, ww = z.shape[-2:]
        z = z.reshape(b, t, self.latent_channels, hh, ww)  # (B, T, C, h, w)
        return z.permute(0, 2, 1, 3, 4).contiguous()  # (B, C, T, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        _check_frames(latents, "latents")
        b, c, t, h, w = latents.shape
        if c != self.latent_channels:
            raise ValueError(f"latents must have {self.latent_channels} channels, got shape {tuple(latents.shape)}")
        device, dtype = self.device, self.dtype
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, h, w)
        outs = []
        for i in range(0, b * t, self.micro_batch_frames):
            z = flat[i : i + self.micro_batch_frames].to(device=device, dtype=torch.float32)  # (m, C, h, w)
            z = (z / self.scaling_factor).to(dtype)  # divide in fp32, then cast to the compute dtype
            outs.append(self.vae.decode(self._layout(z)).sample.float().clamp_(-1.0, 1.0))  # (m, 3, H, W)
        x = torch.cat(outs, dim=0)  # (B*T, 3, H, W)
        hh, ww = x.shape[-2:]
        return x.reshape(b, t, 3, hh, ww).permute(0, 2, 1, 3, 4).contiguous()  # (B, 3, T, H, W)


def frames_to_uint8(x: Tensor) -> Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8, round-half-up of (x+1)/2*255.

    Out-of-range values are clamped and NaN maps to mid-grey (128), so a bad decode never gives garbage bytes.
    """
    _check_frames(x, "frames")
    if x.shape[1] != 3:
        raise ValueError(f"frames must have 3 channels, got shape {tuple(x.shape)}")
    v = (x.float() + 1.0) / 2.0 * 255.0  # (B, 3, T, H, W) in [0, 255]
    v = torch.nan_to_num(v, nan=127.5).clamp_(0.0, 255.0).add_(0.5).floor_()
    return v.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()  # (B, T, H, W, 3)


def uint8_to_frames(u: Tensor) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [-1, 1]; exact inverse of ``frames_to_uint8``."""
    if u.ndim != 5 or u.shape[-1] != 3:
        raise ValueError(f"expected (B, T, H, W, 3), got shape {tuple(u.shape)}")
    if u.dtype != torch.uint8:
        raise ValueError(f"expected uint8, got {u.dtype}")
    return (u.permute(0, 4, 1, 2, 3).float() / 255.0 * 2.0 - 1.0).contiguous()  # (B, 3, T, H, W)


def make_codec(name: str, path: str | os.PathLike[str] | None = None) -> LatentCodec:
    """Build a codec by name: "pixel", "sd-vae" (``path`` = local diffusers VAE dir) or "sd-vae-random"."""
    if name == "pixel":
        return PixelCodec()
    if name == "sd-vae":
        if path is None:
            raise ValueError("codec 'sd-vae' needs a path to a local diffusers VAE directory")
        return SDVAECodec.from_pretrained(path)
    if name == "sd-vae-random":
        return SDVAECodec.random()
    raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_NAMES)}")
