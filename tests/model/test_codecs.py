"""Latent codecs: exact pixel/uint8 round trips, SD-VAE wrapper semantics on a tiny random AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ca2vdm.server.model.codecs import (
    SD_VAE_SCALING_FACTOR,
    LatentCodec,
    PixelCodec,
    SDVAECodec,
    frames_to_uint8,
    make_codec,
    uint8_to_frames,
)

diffusers = pytest.importorskip("diffusers")


def _frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_dir: Path):
    return diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir, local_files_only=True).eval()


# ---- pixel codec and uint8 mapping ----


def test_pixel_codec_round_trip_exact() -> None:
    codec = PixelCodec()
    assert isinstance(codec, LatentCodec)
    assert (codec.name, codec.latent_channels, codec.downsample) == ("pixel", 3, 1)
    x = _frames(2, 3, 5, 7)
    z = codec.encode(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert torch.equal(codec.decode(z), x)
    z.add_(1.0)  # encode must not alias its input
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert codec.to("cpu", torch.float16) is codec


def test_pixel_codec_decode_clamps_and_checks_shape() -> None:
    codec = PixelCodec()
    y = codec.decode(torch.full((1, 3, 1, 2, 2), 3.0))
    assert torch.equal(y, torch.ones(1, 3, 1, 2, 2))
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(3, 2, 2))


def test_uint8_round_trip_all_values() -> None:
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16, 1).repeat(2, 3, 1, 1, 3)  # (B, T, H, W, 3)
    u[..., 1] = u[..., 1].flip(-1)  # channels differ so a channel-order mix-up shows
    x = uint8_to_frames(u)
    assert x.shape == (2, 3, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(frames_to_uint8(x), u)
    assert torch.equal(x[0, 1, 0], u[0, 0, :, :, 1].float() / 255 * 2 - 1)


def test_frames_to_uint8_rounding_and_clamping() -> None:
    # (x+1)/2*255 = 0.5 -> 1 (half up), 254.49 -> 254, out of range -> clamped, NaN -> 128.
    vals = torch.tensor([0.5 / 127.5 - 1, 254.49 / 127.5 - 1, -3.0, 5.0, float("nan"), 0.0], dtype=torch.float64)
    x = vals.reshape(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)  # (B, 3, T, H, W)
    u = frames_to_uint8(x)
    assert u.shape == (1, 1, 1, 6, 3) and u.dtype == torch.uint8
    assert u[0, 0, 0, :, 0].tolist() == [1, 254, 0, 255, 128, 128]


# ---- SD-VAE codec ----


def test_sdvae_from_pretrained_encode_matches_posterior_mean(tiny_vae_dir: Path, tiny_vae) -> None:
    codec = SDVAECodec.from_pretrained(tiny_vae_dir)
    assert (codec.name, codec.latent_channels, codec.downsample) == ("sd-vae", 4, 2)
    x = _frames(2, 3, 16, 12)
    z = codec.encode(x)
    assert z.shape == (2, 4, 3, 8, 6) and z.dtype == torch.float32
    with torch.no_grad():
        flat = x.permute(0, 2, 1, 3, 4).reshape(6, 3, 16, 12)  # (B*T, 3, H, W)
        mean = tiny_vae.encode(flat).latent_dist.mean  # (B*T, 4, 8, 6)
    expected = mean.reshape(2, 3, 4, 8, 6).permute(0, 2, 1, 3, 4) * SD_VAE_SCALING_FACTOR
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    assert not z.requires_grad
    z.mul_(1.0)  # callers may edit latents in place (no inference tensors)


def test_sdvae_decode_shape_range_and_scale(tiny_vae_dir: Path, tiny_vae) -> None:
    codec = SDVAECodec.from_pretrained(tiny_vae_dir)
    z = torch.randn(1, 4, 5, 4, 4)
    y = codec.decode(z)
    assert y.shape == (1, 3, 5, 8, 8) and y.dtype == torch.float32
    assert y.min() >= -1.0 and y.max() <= 1.0
    with torch.no_grad():
        flat = z.permute(0, 2, 1, 3, 4).reshape(5, 4, 4, 4) / SD_VAE_SCALING_FACTOR
        expected = tiny_vae.decode(flat).sample.clamp(-1, 1).reshape(1, 5, 3, 8, 8).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_sdvae_micro_batching_matches_unbatched(tiny_vae_dir: Path) -> None:
    whole = SDVAECodec.from_pretrained(tiny_vae_dir, micro_batch_frames=64)
    small = SDVAECodec.from_pretrained(tiny_vae_dir, micro_batch_frames=3)  # 2*5 = 10 frames: uneven chunks
    x = _frames(2, 5, 8, 8, seed=1)
    za, zb = whole.encode(x), small.encode(x)
    torch.testing.assert_close(zb, za, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.decode(za), whole.decode(za), rtol=1e-5, atol=1e-5)
    # frames are independent: encoding a sub-clip gives the same latents as the slice
    torch.testing.assert_close(whole.encode(x[:, :, 2:4]), za[:, :, 2:4], rtol=1e-5, atol=1e-5)


def test_sdvae_rejects_bad_shapes(tiny_vae_dir: Path) -> None:
    codec = SDVAECodec.from_pretrained(tiny_vae_dir)
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(_frames(1, 1, 7, 8))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError):
        SDVAECodec.from_pretrained(tiny_vae_dir, micro_batch_frames=0)


def test_sdvae_accepts_model_dir_with_vae_subfolder(tiny_vae_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    (model_dir / "vae").mkdir(parents=True)
    for f in tiny_vae_dir.iterdir():
        (model_dir / "vae" / f.name).write_bytes(f.read_bytes())
    codec = make_codec("sd-vae", str(model_dir))
    assert isinstance(codec, SDVAECodec) and codec.downsample == 2


def test_sdvae_missing_or_invalid_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        SDVAECodec.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        SDVAECodec.from_pretrained(empty)
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        SDVAECodec.from_pretrained(other)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="noweights"):
        SDVAECodec.from_pretrained(no_weights)
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="file.bin"):
        SDVAECodec.from_pretrained(a_file)


def test_make_codec_names() -> None:
    assert isinstance(make_codec("pixel"), PixelCodec)
    with pytest.raises(ValueError, match="path"):
        make_codec("sd-vae")
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec("wavelet")


def test_sdvae_random_has_sd_architecture_and_keeps_rng() -> None:
    state = torch.random.get_rng_state()
    codec = SDVAECodec.random(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    cfg = codec.vae.config
    assert tuple(cfg.block_out_channels) == (128, 256, 512, 512)
    assert (cfg.layers_per_block, cfg.norm_num_groups, cfg.latent_channels) == (2, 32, 4)
    assert (codec.latent_channels, codec.downsample) == (4, 8)
    z = codec.encode(_frames(1, 1, 8, 8))
    assert z.shape == (1, 4, 1, 1, 1)
    assert codec.decode(z).shape == (1, 3, 1, 8, 8)


def test_sdvae_channels_last_layout_gives_the_same_frames(tiny_vae_dir: Path) -> None:
    """The channels-last (NHWC) option must not change the result (off by default: slower on an H200)."""
    codec = SDVAECodec.from_pretrained(tiny_vae_dir, micro_batch_frames=3)
    gen = torch.Generator().manual_seed(7)
    frames = torch.rand(2, 3, 2, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 2, 4, 4, generator=gen)
    assert not codec.channels_last  # the default
    latents, decoded = codec.encode(frames), codec.decode(z)
    codec.set_channels_last(True)
    assert next(p for p in codec.vae.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(codec.encode(frames), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(z), decoded, rtol=1e-5, atol=1e-5)
