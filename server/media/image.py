"""Condition images in: PNG/JPEG/WebP/BMP bytes or files to uint8 RGB (H, W, 3), resized and centre-cropped.

Images come from clients, so nothing is decoded before its header passes the limits (pixel count, aspect ratio, a
mode allow-list: no 32-bit integer or float pixels), and decoding keeps its memory near the decoded size: JPEGs decode
at the smallest scale that still covers the target (`draft`), large images shrink by an integer box filter before any
conversion (`reduce`), and 16-bit grey converts with integer arithmetic. A 4096x4096 16-bit PNG peaks at about
3 bytes per pixel above its decoded size.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

#: Largest image (width * height, from the header) ``load_image`` accepts: guards memory against huge uploads.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Most elongated image accepted (long side / short side): a 1 x 39,000,000 PNG is 101 KB and a decompression bomb.
DEFAULT_MAX_ASPECT = 16.0

#: Pillow formats ``load_image`` opens. A fixed allow-list: user bytes never reach exotic decoders (EPS would
#: run Ghostscript, for instance).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # "I": how older Pillows open 16-bit grey PNGs
#: Pixel modes accepted (from the header): 1-16 bits per channel; 32-bit integer and float images are refused.
_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", *_SIXTEEN_BIT_MODES)
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I")  # modes whose pixels average meaningfully


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any pillow mode -> RGB. Transparency is composited onto white; 16-bit grey is scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # (H, W), 0..65535
        grey = ((2 * arr + 257) // 514).astype(np.uint8)  # round(x / 257) in integers: no float64 copy
        del arr
        return Image.fromarray(grey).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_center_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers (H, W) (short side fits), then take the centre (H, W) window.

    Done in one ``resize(box=...)`` call on the source crop, which is the same as resize-then-crop but never
    materialises the (possibly huge, for extreme aspect ratios) intermediate image.
    """
    out_h, out_w = size
    src_w, src_h = im.size
    scale = max(out_h / src_h, out_w / src_w)
    box_w, box_h = out_w / scale, out_h / scale  # source window that maps onto the output
    left, top = (src_w - box_w) / 2.0, (src_h - box_h) / 2.0
    if (src_w, src_h) == (out_w, out_h):
        return im
    return im.resize(
        (out_w, out_h),
        resample=Image.Resampling.BICUBIC,
        box=(left, top, left + box_w, top + box_h),
    )


def _check_header(im: Image.Image, label: str, max_pixels: int, max_aspect: float) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise ValueError(f"image {label} is {width}x{height} = {width * height} pixels, above the limit of "
                         f"{max_pixels}")  # fmt: skip
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise ValueError(f"image {label} is {width}x{height}, more elongated than {max_aspect:g}:1")
    if im.mode not in _MODES:
        raise ValueError(f"image {label} has pixel mode {im.mode!r}: more than 16 bits per channel is not accepted")


def _shrink(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Box-reduce a decoded image that is at least 4x the target's long side on both sides down to about 2x (no
    conversion copies at full size; either way round, as EXIF may rotate it); the final bicubic resize keeps its
    quality from there."""
    factor = min(im.width, im.height) // (2 * max(size))
    if factor < 2 or im.mode not in _REDUCIBLE:
        return im
    return im.reduce(factor)


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Tensor:
    """Decode a PNG/JPEG (also WebP/BMP) to uint8 RGB (H, W, 3); with ``size=(H, W)``, resize + centre-crop.

    The usual video-prediction preprocessing: scale the short side to fit, centre-crop to exactly (H, W).
    EXIF orientation is applied, animated images give their first frame, alpha is composited onto white.

    Raises FileNotFoundError for a missing path, ValueError for undecodable data or an image whose header
    declares more than ``max_pixels`` pixels, a long side more than ``max_aspect`` times its short side, or a pixel
    mode beyond 16 bits per channel (all checked before the pixel data is decoded).
    """
    if size is not None:
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"size must be (H, W) with positive integers, got {size!r}")
        if size[0] * size[1] > max_pixels:
            raise ValueError(f"requested size {size[0]}x{size[1]} exceeds the limit of {max_pixels} pixels")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source: str | io.BytesIO = io.BytesIO(bytes(path_or_bytes))
        label = "<bytes>"
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            if not path.exists():
                raise FileNotFoundError(f"image not found: {str(path)!r}")
            raise ValueError(f"cannot decode image: not a regular file: {str(path)!r}")
        source, label = str(path), repr(str(path))

    with warnings.catch_warnings():
        # Our own limit applies; silence pillow's DecompressionBombWarning (its hard error is caught below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source, formats=IMAGE_FORMATS) as im:
                _check_header(im, label, max_pixels, max_aspect)  # nothing decoded yet
                if size is not None and im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale where that covers
                    side = int(max(size))  # either way round: EXIF may rotate it
                    im.draft("RGB", (side, side))
                im.load()
                if size is not None:
                    im = _shrink(im, (int(size[0]), int(size[1])))
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
                if size is not None:
                    rgb = _resize_center_crop(rgb, (int(size[0]), int(size[1])))
                arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), owns its memory
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {label} is too large: {e}") from e
        except (OSError, SyntaxError, Image.UnidentifiedImageError) as e:
            # UnidentifiedImageError and truncated-data errors are OSErrors; some plugins raise SyntaxError.
            raise ValueError(f"cannot decode image {label}: {e}") from e
    return torch.from_numpy(arr)  # (H, W, 3) uint8
