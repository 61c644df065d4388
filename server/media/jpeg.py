"""JPEG clips: one baseline JPEG per frame, for clients that just draw images (no MSE)."""

from __future__ import annotations

import io

from PIL import Image
from torch import Tensor

from .clip import check_clip, check_first_frame


class JpegEncoder:
    """One baseline JPEG per frame, for clients that just draw images (no MSE)."""

    mime = "image/jpeg"

    def __init__(self, quality: int = 85, *, width: int | None = None, height: int | None = None) -> None:
        if isinstance(quality, bool) or int(quality) != quality or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer in [1, 100], got {quality!r}")
        self.quality = int(quality)
        self.width, self.height = width, height  # checked against clips when given

    def init_segment(self) -> None:
        return None

    def encode(self, frames: Tensor, first_frame: int) -> list[bytes]:
        """(n, H, W, 3) uint8 RGB -> n JPEG files, in order. ``first_frame`` is only validated (JPEGs carry no time)."""
        check_clip(frames, self.height, self.width)
        check_first_frame(first_frame)
        out: list[bytes] = []
        for frame in frames.detach().cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
            out.append(buf.getvalue())
        return out
