"""Image loading (decode, crop, limits) and MP4 writing/reading (frame count, size, fidelity, atomicity)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ca2vdm.server.media import encoded_size, load_image, read_video, write_mp4
from ca2vdm.server.media import video as media_video


def _smooth_video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency frames (video codecs keep these, unlike white noise): (T, H, W, 3) uint8."""
    g = torch.Generator().manual_seed(seed)
    n = max(2, min(h, w) // 8)  # control points: about one per 8 pixels
    coarse = torch.rand(t, 3, n, n, generator=g) * 255  # (T, 3, n, n)
    fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)  # (T, 3, H, W)
    return fine.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (T, H, W, 3)


def _encode_image(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares (width, height) but carries no pixel data: tests size limits cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---- write_mp4 / read_video ----


@pytest.mark.parametrize("t", [1, 17])
@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (16, 16)])
def test_mp4_round_trip_even(tmp_path: Path, t: int, hw: tuple[int, int]) -> None:
    h, w = hw
    video = _smooth_video(t, h, w, seed=t)
    out = tmp_path / "clip.mp4"
    write_mp4(out, video, fps=8)
    got = read_video(out)
    assert got.dtype == torch.uint8 and got.shape == (t, h, w, 3)
    err = (got.float() - video.float()).abs().mean().item()
    assert err < 8, err
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind


@pytest.mark.parametrize("t", [1, 17])
@pytest.mark.parametrize("hw", [(31, 17), (33, 32), (32, 21)])
def test_mp4_odd_sizes_padded_by_edge_replication(tmp_path: Path, t: int, hw: tuple[int, int]) -> None:
    h, w = hw
    video = _smooth_video(t, h, w, seed=3)
    out = tmp_path / "odd.mp4"
    write_mp4(out, video, fps=8)
    got = read_video(out)
    ph, pw = encoded_size(h, w)
    assert (ph % 2, pw % 2) == (0, 0) and (ph - h, pw - w) == (h % 2, w % 2)
    assert got.shape == (t, ph, pw, 3)
    err = (got[:, :h, :w].float() - video.float()).abs().mean().item()
    assert err < 8, err
    padded = torch.from_numpy(np.pad(video.numpy(), ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge"))
    assert (got.float() - padded.float()).abs().mean().item() < 8


def test_mp4_overwrites_atomically_and_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    write_mp4(out, _smooth_video(2, 16, 16), fps=4)
    write_mp4(out, _smooth_video(5, 16, 16), fps=4)  # replaces the old file
    assert read_video(out).shape[0] == 5
    with pytest.raises(ValueError):
        write_mp4(out, torch.zeros(0, 16, 16, 3, dtype=torch.uint8), fps=8)
    with pytest.raises(ValueError):
        write_mp4(out, torch.zeros(2, 16, 16, 3), fps=8)  # float, not uint8
    with pytest.raises(ValueError):
        write_mp4(out, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), fps=8)
    with pytest.raises(ValueError):
        write_mp4(out, torch.zeros(2, 16, 16, 3, dtype=torch.uint8), fps=0)
    assert read_video(out).shape[0] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_mp4_failure_mid_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "v.mp4"
    write_mp4(out, _smooth_video(3, 16, 16), fps=8)
    before = out.read_bytes()
    real = media_video.av.VideoFrame.from_ndarray
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(media_video.av.VideoFrame, "from_ndarray", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        write_mp4(out, _smooth_video(6, 16, 16), fps=8)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_read_video_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError):
        read_video(bad)


# ---- load_image ----


def test_load_png_and_jpeg_bytes() -> None:
    arr = _smooth_video(1, 24, 40)[0].numpy()  # (24, 40, 3)
    png = load_image(_encode_image(arr, "PNG"))
    assert png.dtype == torch.uint8 and png.shape == (24, 40, 3)
    assert torch.equal(png, torch.from_numpy(arr))
    jpg = load_image(_encode_image(arr, "JPEG", quality=95))
    assert jpg.shape == (24, 40, 3)
    assert (jpg.float() - png.float()).abs().mean() < 4


def test_load_image_modes_become_rgb(tmp_path: Path) -> None:
    grey = np.full((6, 5), 77, dtype=np.uint8)
    g = load_image(_encode_image(grey, "PNG"))
    assert g.shape == (6, 5, 3) and bool((g == 77).all())
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    out = load_image(_encode_image(rgba, "PNG"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[3, 3].tolist() == [255, 255, 255]
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))  # 16-bit grey
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    assert bool((load_image(buf.getvalue()) == 255).all())
    path = tmp_path / "img.png"
    path.write_bytes(_encode_image(rgba[..., :3].copy(), "PNG"))
    assert load_image(path).shape == (4, 4, 3)
    assert load_image(str(path)).shape == (4, 4, 3)


def test_load_image_resize_short_side_then_center_crop() -> None:
    # Left third red, middle green, right third blue: a 256x(3*256) image cropped to 64x64 keeps only green.
    arr = np.zeros((256, 768, 3), dtype=np.uint8)
    arr[:, :256, 0] = 255
    arr[:, 256:512, 1] = 255
    arr[:, 512:, 2] = 255
    data = _encode_image(arr, "PNG")
    out = load_image(data, size=(64, 64))
    assert out.shape == (64, 64, 3)
    inner = out[:, 3:-3]  # bicubic blends in the neighbours at the two crop edges, as resize-then-crop does
    assert bool((inner[..., 1] >= 250).all()) and int(inner[..., [0, 2]].max()) <= 5
    wide = load_image(data, size=(32, 96))  # same aspect: whole image, scaled
    assert wide.shape == (32, 96, 3)
    assert wide[16, 5].tolist()[0] > 250 and wide[16, 90].tolist()[2] > 250
    tall = load_image(_encode_image(np.zeros((50, 30, 3), np.uint8), "JPEG"), size=(17, 40))  # upscale + odd
    assert tall.shape == (17, 40, 3)
    with pytest.raises(ValueError):
        load_image(data, size=(0, 4))


def test_load_image_garbage_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(b"this is not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(b"")
    truncated = _encode_image(_smooth_video(1, 64, 64)[0].numpy(), "PNG")[:100]
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(tmp_path)  # a directory


def test_load_image_refuses_huge_declared_size() -> None:
    with pytest.raises(ValueError, match="limit"):
        load_image(_png_header_only(8000, 6000))  # 48 MP: above our 40 MP limit, below pillow's own
    with pytest.raises(ValueError):
        load_image(_png_header_only(100_000, 100_000))  # pillow's decompression-bomb error, as ValueError
    small = _encode_image(np.zeros((40, 40, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="limit"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=1600).shape == (40, 40, 3)
