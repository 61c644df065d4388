"""Video files: H.264 MP4 out (whole jobs, atomically), any video in (tests, evaluation, training data).

Everything here works on uint8 RGB tensors in (T, H, W, 3) layout, the layout the API and encoders use;
conversion to the model's [-1, 1] (B, 3, T, H, W) lives in ``ca2vdm.server.model.codecs``.
"""

from __future__ import annotations

import os
import tempfile
import threading
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


class Mp4Writer:
    """An H.264 (libx264, yuv420p) MP4 written clip by clip, in constant memory, and published atomically.

    Frames go to a temporary file beside `path` as they come (`append`); `close()` finishes the encoder and the
    file and returns the temporary path, which the caller renames over `path` (`publish`) or deletes; `abort()`
    deletes it. A crash never leaves a half-written file under the final name. Same settings as `write_mp4`, whose
    output it equals frame for frame: pts = frame index (time base 1/fps), the encoder flushed, `faststart`.
    4:2:0 chroma needs even sizes, so an odd H or W is padded by one edge row/column (see `encoded_size`).
    Thread-safe: `abort` from one thread waits for an `append` running in another.
    """

    def __init__(self, path: str | os.PathLike[str], fps: int, crf: int = 18, threads: int = 0) -> None:
        if int(fps) != fps or fps < 1:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.path = Path(path)
        self.fps, self.crf = int(fps), int(crf)
        self.threads = int(threads)  # x264 threads; 0: its own choice (1.5 per core)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.num_frames = 0
        self._size: tuple[int, int] | None = None  # (H, W) of the stream, fixed by the first clip
        self._container: av.container.OutputContainer | None = None
        self._stream = None
        self._lock = threading.Lock()

    def append(self, frames: Tensor) -> None:
        """Encode uint8 RGB frames (T, H, W, 3); every call must have the first call's H and W."""
        with self._lock:
            self._append(frames)

    def _append(self, frames: Tensor) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        t, h, w, _ = frames.shape
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"need at least one non-empty frame, got shape {tuple(frames.shape)}")
        if self._size is None:
            self._open(h, w)
        elif (h, w) != self._size:
            raise ValueError(f"frames are {h}x{w}, the video is {self._size[0]}x{self._size[1]}")
        video = frames.detach().cpu().numpy()  # (T, H, W, 3)
        ph, pw = encoded_size(h, w)
        if (ph, pw) != (h, w):
            video = np.pad(video, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")  # (T, ph, pw, 3)
        video = np.ascontiguousarray(video)
        assert self._container is not None and self._stream is not None
        for i in range(t):
            frame = yuv420_frame(video[i])
            frame.pts = self.num_frames
            self._container.mux(self._stream.encode(frame))
            self.num_frames += 1

    def _open(self, h: int, w: int) -> None:
        self._size = (h, w)
        ph, pw = encoded_size(h, w)
        self._container = av.open(str(self.tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        stream = self._container.add_stream("libx264", rate=Fraction(self.fps, 1))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.time_base = Fraction(1, self.fps)
        stream.options = {"crf": str(self.crf), "preset": "medium", "threads": str(self.threads)}
        tag_bt709(stream.codec_context)
        self._stream = stream

    def close(self) -> Path:
        """Finish the file (flushes the encoder's delayed frames); returns the temporary path to publish."""
        with self._lock:
            return self._close()

    def _close(self) -> Path:
        if self._container is None:
            raise ValueError("no frames were written")
        self._container.mux(self._stream.encode(None))  # type: ignore[union-attr]
        self._container.close()
        self._container = None
        os.chmod(self.tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary, shareable file
        return self.tmp

    def publish(self) -> None:
        """close() and rename over the final path."""
        os.replace(self.close(), self.path)

    def abort(self) -> None:
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass
            self._container = None
        self.tmp.unlink(missing_ok=True)


def write_mp4(path: str | os.PathLike[str], frames: Tensor, fps: int, crf: int = 18) -> None:
    """Write uint8 RGB frames (T, H, W, 3) as an H.264 (libx264, yuv420p) MP4, atomically (see `Mp4Writer`).

    libx264 accepts frames as small as 2x2, so no padding beyond even sizes is done; `read_video` returns the
    padded size. The MP4 has ``faststart`` (moov first) so browsers can play it while downloading.
    """
    writer = Mp4Writer(path, fps, crf)
    try:
        writer.append(frames)
        writer.publish()
    except BaseException:
        writer.abort()
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
