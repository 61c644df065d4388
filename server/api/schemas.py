"""Request and message schemas (pydantic at the edge; the engine gets validated `SessionParams`)."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StartMessage(BaseModel):
    """First websocket message (DESIGN.md). Missing fields take server defaults."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    image: str | None = None  # base64 PNG/JPEG
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: Literal["ddim", "iddpm"] | None = None
    steps: int | None = Field(None, ge=1)
    num_frames: int | None = Field(None, ge=1)
    format: Literal["fmp4", "jpeg"] = "fmp4"


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Strict base64 (a data: URL prefix is accepted); ValueError with a reason otherwise."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:
        raise ValueError(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not valid base64: {exc}") from exc
