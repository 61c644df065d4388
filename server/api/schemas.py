"""Request and message schemas (pydantic at the edge; the engine gets validated `SessionParams`)."""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.media import FORMATS, load_image
from ca2vdm.server.model.diffusion import SAMPLERS

SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]  # Literal["ddim", "iddpm"]
FormatName = Literal[FORMATS]  # type: ignore[valid-type]  # Literal["fmp4", "jpeg"]

if TYPE_CHECKING:
    from ca2vdm.server.engine.engine import Engine

    from .settings import Settings


class StartMessage(BaseModel):
    """First websocket message (DESIGN.md). Missing fields take server defaults."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    image: str | None = None  # base64 PNG/JPEG
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)
    num_frames: int | None = Field(None, ge=1)
    format: FormatName = "fmp4"


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


class VideoRequest(BaseModel):
    """POST /v1/videos body."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    num_frames: int = Field(ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)


def build_params(
    image_b64: str | None,
    seed: int | None,
    sampler: str | None,
    steps: int | None,
    num_frames: int | None,
    fmt: str,
    engine: Engine,
    settings: Settings,
) -> SessionParams:
    """Engine parameters with server defaults and limits; ValueError with a reason for bad input."""
    pipe = engine.pipe
    image = None
    if image_b64 is not None:
        raw = decode_base64(image_b64, settings.max_image_bytes)
        if len(raw) > settings.max_image_bytes:
            raise ValueError(f"image is larger than {settings.max_image_bytes} bytes")
        image = load_image(raw, size=pipe.frame_size, max_pixels=settings.max_image_pixels)
    sampler = sampler or pipe.config.default_sampler
    if steps is None:
        steps = pipe.default_steps(sampler)
    if steps > settings.max_steps:
        raise ValueError(f"steps must be <= {settings.max_steps}")
    if num_frames is not None and num_frames > settings.max_frames:
        raise ValueError(f"num_frames must be <= {settings.max_frames}")
    seed = seed if seed is not None else secrets.randbelow(2**31)
    return SessionParams(image=image, seed=seed, sampler=sampler, steps=steps, num_frames=num_frames, format=fmt)
