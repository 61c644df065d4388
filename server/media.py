"""Image and video I/O (pillow + PyAV): condition images in, H.264 MP4 out.

Everything here works on uint8 RGB tensors in (H, W, 3) / (T, H, W, 3) layout, the layout the API and
encoders use; conversion to the model's [-1, 1] (B, 3, T, H, W) lives in ``server.model.codecs``.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc, Interpolation
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "load_image",
    "encoded_size",
    "write_mp4",
    "read_video",
]

#: Largest image (width * height, from the header) ``load_image`` accepts: guards memory against huge uploads.
DEFAULT_MAX_PIXELS = 40_000_000

#: Pillow formats ``load_image`` opens. A fixed allow-list: user bytes never reach exotic decoders (EPS would
#: run Ghostscript, for instance).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

# swscale's default RGB<->YUV path is a fast approximation that shifts colours by 2-3 levels per round trip;
# accurate rounding with full chroma interpolation brings a flat colour back within 1 level.
_SWS_FLAGS = (
    Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any pillow mode -> RGB. Transparency is composited onto white; 16-bit grey is scaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)  # (H, W), 0..65535
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
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


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Decode a PNG/JPEG (also WebP/BMP) to uint8 RGB (H, W, 3); with ``size=(H, W)``, resize + centre-crop.

    The usual video-prediction preprocessing: scale the short side to fit, centre-crop to exactly (H, W).
    EXIF orientation is applied, animated images give their first frame, alpha is composited onto white.

    Raises FileNotFoundError for a missing path, ValueError for undecodable data or an image whose header
    declares more than ``max_pixels`` pixels (checked before the pixel data is decoded).
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
                width, height = im.size  # from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise ValueError(
                        f"image {label} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
                    )
                im.load()
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


def encoded_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) that ``write_mp4`` stores for an (H, W) input: each side rounded up to even (4:2:0 chroma)."""
    return height + height % 2, width + width % 2


def tag_bt709(codec_context: av.codec.context.CodecContext) -> None:
    """Tag BT.709 limited range in the H.264 VUI: untagged streams are read as BT.601 by some players and
    BT.709 by others (browsers), which visibly shifts colours."""
    cc = codec_context
    cc.colorspace, cc.color_range = Colorspace.ITU709, ColorRange.MPEG
    cc.color_primaries, cc.color_trc = ColorPrimaries.BT709, ColorTrc.BT709


def yuv420_frame(rgb: np.ndarray) -> av.VideoFrame:
    """An (H, W, 3) uint8 RGB array as a BT.709 limited-range yuv420p frame (accurate conversion)."""
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p",
        dst_colorspace=Colorspace.ITU709,
        dst_color_range=ColorRange.MPEG,
        dst_color_primaries=ColorPrimaries.BT709,
        dst_color_trc=ColorTrc.BT709,
        interpolation=_SWS_FLAGS,
    )


def write_mp4(path: str | os.PathLike[str], frames: Tensor, fps: int, crf: int = 18) -> None:
    """Write uint8 RGB frames (T, H, W, 3) as an H.264 (libx264, yuv420p) MP4, atomically.

    4:2:0 chroma needs even sizes (H.264 cannot crop a single pixel in 4:2:0 either), so an odd H or W is
    padded by one row/column that repeats the edge pixels; ``read_video`` then returns the padded size, see
    ``encoded_size``. libx264 accepts frames as small as 2x2, so no other padding is done.

    Every frame is encoded with pts = index (time base 1/fps) and the encoder is flushed, so the file holds
    exactly T frames. The MP4 has ``faststart`` (moov first) so browsers can play it while downloading.
    Output goes to a temporary file in the target directory, renamed over ``path`` only once complete: a crash
    never leaves a half-written file under the final name.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1 or h < 1 or w < 1:
        raise ValueError(f"need at least one non-empty frame, got shape {tuple(frames.shape)}")
    if int(fps) != fps or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")

    video = frames.detach().cpu().numpy()  # (T, H, W, 3)
    ph, pw = encoded_size(h, w)
    if (ph, pw) != (h, w):
        video = np.pad(video, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")  # (T, ph, pw, 3)
    video = np.ascontiguousarray(video)

    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with av.open(tmp_name, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
            stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
            stream.time_base = Fraction(1, int(fps))
            stream.options = {"crf": str(int(crf)), "preset": "medium"}
            tag_bt709(stream.codec_context)
            for i in range(t):
                frame = yuv420_frame(video[i])
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush: delayed (B-)frames
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the result is an ordinary, shareable file
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """Decoded frame -> (H, W, 3) uint8 RGB, honouring its colour tags (untagged: BT.601, limited range)."""
    return frame.reformat(
        format="rgb24",
        src_colorspace=None,  # the frame's own tag (swscale reads "unspecified" as BT.601)
        src_color_range=frame.color_range,
        dst_color_range=ColorRange.JPEG,
        interpolation=_SWS_FLAGS,
    ).to_ndarray()


def read_video(path: str | os.PathLike[str]) -> Tensor:
    """Decode every frame of the first video stream to uint8 RGB (T, H, W, 3) (tests, evaluation)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video not found: {str(p)!r}")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise ValueError(f"no video stream in {str(p)!r}")
            frames = [_frame_to_rgb(f) for f in container.decode(video=0)]  # each (H, W, 3)
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video {str(p)!r}: {e}") from e
    if not frames:
        raise ValueError(f"video {str(p)!r} has no frames")
    return torch.from_numpy(np.stack(frames))  # (T, H, W, 3) uint8
