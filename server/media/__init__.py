"""Media in and out: condition images (`image`), clip encoders for streams (`clip`, `fmp4`, `jpeg`), and whole
videos (`video`). Everything works on uint8 RGB tensors, (H, W, 3) per frame."""

from __future__ import annotations

from .clip import ClipEncoder
from .fmp4 import Fmp4Encoder
from .image import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, IMAGE_FORMATS, load_image
from .jpeg import JpegEncoder
from .video import Mp4Writer, encoded_size, read_video, write_mp4

#: Stream output formats, each with its encoder (the one list the API schemas and the engine use).
FORMATS = ("fmp4", "jpeg")


def make_encoder(fmt: str, width: int, height: int, fps: int) -> ClipEncoder:
    """The encoder for a stream's output format (one of FORMATS); ValueError for anything else."""
    if fmt == "fmp4":
        return Fmp4Encoder(width, height, fps)
    if fmt == "jpeg":
        return JpegEncoder(width=width, height=height)
    raise ValueError(f"unknown output format {fmt!r}; expected one of {FORMATS}")


__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "IMAGE_FORMATS",
    "ClipEncoder",
    "Fmp4Encoder",
    "JpegEncoder",
    "Mp4Writer",
    "encoded_size",
    "load_image",
    "make_encoder",
    "read_video",
    "write_mp4",
]
