"""What every clip encoder is: the `ClipEncoder` protocol, and the checks each makes on a clip."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class ClipEncoder(Protocol):
    """Turns a stream's clips into the binary messages a client receives, one encoder per stream, clips in order.

    `mime`: the type of the media (for MSE: `video/mp4; codecs=...` from the real SPS). `init_segment()`: bytes the
    client needs once, before any clip (fMP4: ftyp + moov), or None. `encode(frames, first_frame)`: the messages of
    one clip, (n, H, W, 3) uint8 RGB frames whose first is frame `first_frame` of the stream.
    """

    mime: str

    def init_segment(self) -> bytes | None: ...

    def encode(self, frames: Tensor, first_frame: int) -> list[bytes]: ...


def check_clip(frames: Tensor, height: int | None, width: int | None) -> None:
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (n >= 1, H, W, 3), got shape {tuple(frames.shape)}")
    if height is not None and width is not None and tuple(frames.shape[1:3]) != (height, width):
        raise ValueError(f"frames must be {height}x{width} (H x W), got shape {tuple(frames.shape)}")


def check_first_frame(first_frame: int) -> int:
    if isinstance(first_frame, bool) or int(first_frame) != first_frame or first_frame < 0:
        raise ValueError(f"first_frame must be a non-negative integer, got {first_frame!r}")
    return int(first_frame)
