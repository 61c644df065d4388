"""Video files: H.264 MP4 out (whole jobs, atomically), any video in (tests, evaluation, training data).

Everything here works on uint8 RGB tensors in (T, H, W, 3) layout, the layout the API and encoders use;
conversion to the model's [-1, 1] (B, 3, T, H, W) lives in ``ca2vdm.server.model.codecs``.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc, Interpolation
from torch import Tensor

# swscale's default RGB<->YUV path is a fast approximation that shifts colours by 2-3 levels per round trip;
# accurate rounding with full chroma interpolation brings a flat colour back within 1 level.
_SWS_FLAGS = (
    Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP
)


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
