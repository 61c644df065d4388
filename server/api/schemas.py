"""Request and message schemas: pydantic at the edge, strict (JSON types only: no "17" or true for an integer;
no unknown fields), parsed from the raw JSON text by pydantic's own parser (which bounds nesting depth)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter, ValidationError

from ca2vdm.server.engine.session import PACES
from ca2vdm.server.media import FORMATS
from ca2vdm.server.model.diffusion import SAMPLERS

SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]  # Literal["ddim", "iddpm"]
FormatName = Literal[FORMATS]  # type: ignore[valid-type]  # Literal["fmp4", "jpeg"]
PaceName = Literal[PACES]  # type: ignore[valid-type]  # Literal["realtime", "max"]

_STRICT = ConfigDict(extra="forbid", strict=True)


class StartMessage(BaseModel):
    """First websocket message (DESIGN.md). Missing fields take server defaults."""

    model_config = _STRICT

    type: Literal["start"]
    image: str | None = None  # base64 PNG/JPEG
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)
    num_frames: int | None = Field(None, ge=1)
    format: FormatName = "fmp4"
    pace: PaceName = "realtime"


class ResumeMessage(BaseModel):
    """First websocket message of a reconnecting client: the session's `resume_token`, and the first frame it lacks."""

    model_config = _STRICT

    type: Literal["resume"]
    token: str = Field(min_length=1, max_length=128)
    from_frame: int = Field(ge=0)


class FirstMessage(RootModel[Annotated[StartMessage | ResumeMessage, Field(discriminator="type")]]):
    """What opens a stream: `start` or `resume`."""


class StopMessage(BaseModel):
    model_config = _STRICT
    type: Literal["stop"]


class AckMessage(BaseModel):
    """The client has received every frame before `frames` (it sends one after each clip)."""

    model_config = _STRICT
    type: Literal["ack"]
    frames: int = Field(ge=0)


ControlMessage = TypeAdapter(Annotated[StopMessage | AckMessage, Field(discriminator="type")])


class VideoRequest(BaseModel):
    """POST /v1/videos body."""

    model_config = _STRICT

    image: str | None = None
    num_frames: int = Field(ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: SamplerName | None = None
    steps: int | None = Field(None, ge=1)


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A short reason: the first few problems as `field: message`."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
