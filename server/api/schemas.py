"""Request and message schemas: pydantic at the edge, strict (JSON types only: no "17" or true for an integer;
no unknown fields), parsed from the raw JSON text by pydantic's own parser (which bounds nesting depth). The
websocket messages are the protocol's (`ca2vdm.client.protocol`); the REST body is here; both get this server's limits
(`request_models`), so what the server validates is exactly what its OpenAPI document and message schemas say."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    TypeAdapter,
    ValidationError,
    create_model,
)

from ca2vdm.client.protocol import (
    MAX_SEED,
    AckMessage,
    ClipMessage,
    DoneMessage,
    ErrorMessage,
    GuidanceScale,
    Int,
    PromptMessage,
    PromptText,
    ReadyMessage,
    ResumeMessage,
    SamplerName,
    StartMessage,
    StopMessage,
    bounded,
    dump,
)

from .settings import Settings

__all__ = ["AckMessage", "ClipMessage", "ControlMessage", "DoneMessage", "ErrorMessage", "PromptMessage",
           "ReadyMessage", "RequestModels", "ResumeMessage", "StartMessage", "StopMessage", "VideoRequest", "describe",
           "dump", "request_models"]  # fmt: skip

ControlMessage = TypeAdapter(Annotated[StopMessage | AckMessage | PromptMessage, Field(discriminator="type")])


class VideoRequest(BaseModel):
    """POST /v1/videos body (the server's limits are added by `request_models`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(None, description="base64 PNG/JPEG/WebP/BMP condition image (a data: URL is accepted)")
    num_frames: Int(1)
    seed: Int(0, MAX_SEED) | None = None
    sampler: SamplerName | None = None
    steps: Int(1) | None = None
    prompt: PromptText = None
    guidance_scale: GuidanceScale = None


def base64_chars(max_bytes: int) -> int:
    """Characters of the base64 text of `max_bytes` bytes (a data: URL prefix counts too)."""
    return (max_bytes + 2) // 3 * 4


@dataclass(frozen=True)
class RequestModels:
    """What clients send, with this server's limits: the models it validates with and the schemas it publishes."""

    start: type[BaseModel]
    resume: type[BaseModel]
    first: type[RootModel[Any]]  # start | resume, by `type`
    video: type[BaseModel]


def request_models(settings: Settings, takes_text: bool = True) -> RequestModels:
    """`takes_text` False (a video-prediction model): `prompt` and `guidance_scale` may only be null, so the schemas
    a client reads say what the server accepts."""
    image = base64_chars(settings.max_image_bytes)
    start = bounded(StartMessage, steps=settings.max_steps, num_frames=settings.max_frames, image=image)
    video = bounded(VideoRequest, steps=settings.max_steps, num_frames=settings.max_frames, image=image)
    if not takes_text:
        start, video = _without_text(start), _without_text(video)
    first = RootModel[Annotated[start | ResumeMessage, Field(discriminator="type")]]  # type: ignore[valid-type]
    return RequestModels(start=start, resume=ResumeMessage, first=first, video=video)


def _no_text(value: Any) -> Any:
    if value is not None:
        raise ValueError("this model is not text-conditioned: it takes no prompt or guidance_scale")
    return value


NoText = Annotated[None, BeforeValidator(_no_text), Field(description="null: this model is not text-conditioned")]


def _without_text(model: type[BaseModel]) -> type[BaseModel]:
    return create_model(model.__name__, __base__=model, prompt=(NoText, None), guidance_scale=(NoText, None))


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A short reason: the first few problems as `field: message`."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
