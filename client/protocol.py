"""The `/v1/stream` websocket protocol as data: one pydantic model per message, both directions (DESIGN.md).

The server validates what clients send with these models (tightened by its configured limits, `bounded`), builds what
it sends with them, and publishes their JSON Schemas at `GET /v1/stream/messages` (`message_schemas`); the Python
client validates what it receives with them. Models are strict (JSON types only: `"17"` or `true` is not an integer)
and refuse unknown fields; an integer may be written as an integral number (`17.0`), as JSON Schema allows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, create_model

# The protocol's enumerations (the server's own lists are tested equal to these: tests/api/test_protocol.py).
SAMPLERS = ("ddim", "iddpm", "dpm++2m")
FORMATS = ("fmp4", "jpeg")
PACES = ("realtime", "max")
ERROR_CODES = ("invalid_request", "unauthorized", "server_busy", "slow_consumer", "expired", "replaced", "internal")
MAX_SEED = 2**63 - 1
MAX_TOKEN_CHARS = 128
MAX_PROMPT_CHARS = 2000  # a text prompt (text-conditioned models)
MAX_GUIDANCE_SCALE = 50.0

SamplerName = Literal["ddim", "iddpm", "dpm++2m"]
FormatName = Literal["fmp4", "jpeg"]
PaceName = Literal["realtime", "max"]
ErrorCode = Literal["invalid_request", "unauthorized", "server_busy", "slow_consumer", "expired", "replaced",
                    "internal"]  # fmt: skip


def _integral(value: Any) -> Any:
    """17.0 is the integer 17 (JSON Schema's "integer"); 17.5 stays a float and is refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(ge: int | None = None, le: int | None = None) -> Any:  # noqa: N802 - a type, used as one
    """An integer in [ge, le]: the bounds on the integer itself (its JSON Schema says minimum/maximum), then 17.0
    accepted as 17."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


_STRICT = ConfigDict(extra="forbid", strict=True)

# text-conditioned models: the prompt and guidance of a start (and of a REST job)
PromptText = Annotated[
    str | None,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="text-conditioned models: what the video shows "
          "(none: unconditional)"),
]  # fmt: skip
GuidanceScale = Annotated[
    float | None,
    Field(ge=1, le=MAX_GUIDANCE_SCALE, description="classifier-free guidance (1: off; default: the model's)"),
]


# ---- client -> server ----------------------------------------------------------------------------------------------


class StartMessage(BaseModel):
    """Opens a stream. Missing fields take the server's defaults; `num_frames` null streams until `stop`."""

    model_config = _STRICT

    type: Literal["start"]
    image: str | None = Field(None, description="base64 PNG/JPEG/WebP/BMP condition image")
    seed: Int(0, MAX_SEED) | None = None
    sampler: SamplerName | None = None
    steps: Int(1) | None = None
    num_frames: Int(1) | None = None
    format: FormatName = "fmp4"
    pace: PaceName = "realtime"
    prompt: PromptText = None
    guidance_scale: GuidanceScale = None


class ResumeMessage(BaseModel):
    """Opens a connection that continues a session: its `resume_token` and the first frame the client lacks."""

    model_config = _STRICT

    type: Literal["resume"]
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)
    from_frame: Int(0)


class StopMessage(BaseModel):
    """Ends the stream (the server answers `done`)."""

    model_config = _STRICT
    type: Literal["stop"]


class AckMessage(BaseModel):
    """The client has every frame before `frames` (sent after each clip's media)."""

    model_config = _STRICT
    type: Literal["ack"]
    frames: Int(0)


class PromptMessage(BaseModel):
    """Text-conditioned models: condition the stream on `text` from its next clip on. `recache`: also rewrite the
    cached frames under the new prompt (a faster, stronger change; costs one cache write), else they keep theirs."""

    model_config = _STRICT
    type: Literal["prompt"]
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    recache: bool = False


# ---- server -> client ----------------------------------------------------------------------------------------------


class ReadyMessage(BaseModel):
    """The stream is running; for fmp4 the next binary message is the init segment."""

    model_config = _STRICT
    type: Literal["ready"] = "ready"
    session_id: str
    width: Int(1)
    height: Int(1)
    fps: Int(1)
    chunk_frames: Int(1)
    format: FormatName
    mime: str | None
    resume_token: str | None = Field(description="resumes this session after a dropped connection")
    first_frame: Int(0) = Field(0, description="the first frame this connection sends")


class ClipMessage(BaseModel):
    """A finished clip; its media follow (fmp4: one segment; jpeg: `num_frames` images)."""

    model_config = _STRICT
    type: Literal["clip"] = "clip"
    index: Int(0)
    first_frame: Int(0)
    num_frames: Int(1)
    gen_ms: float = Field(ge=0)
    ahead_ms: float | None = Field(None, description="live streams: how long before it was due (< 0: late)")


class DoneMessage(BaseModel):
    """The stream ended normally (then close 1000)."""

    model_config = _STRICT
    type: Literal["done"] = "done"
    frames: Int(0)
    reason: Literal["max_frames"] | None = None


class ErrorMessage(BaseModel):
    """The stream ended with an error (then close 1008, 1011 or 1013)."""

    model_config = _STRICT
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


CLIENT_MESSAGES: tuple[type[BaseModel], ...] = (StartMessage, ResumeMessage, StopMessage, AckMessage, PromptMessage)
SERVER_MESSAGES: tuple[type[BaseModel], ...] = (ReadyMessage, ClipMessage, DoneMessage, ErrorMessage)

ServerMessage = TypeAdapter(
    Annotated[ReadyMessage | ClipMessage | DoneMessage | ErrorMessage, Field(discriminator="type")]
)


def dump(message: BaseModel) -> dict[str, Any]:
    """A server message as JSON data: optional fields that are unset are left out (ready keeps its nulls)."""
    return message.model_dump(exclude_none=not isinstance(message, ReadyMessage))


def bounded(model: type[BaseModel], **limits: int) -> type[BaseModel]:
    """`model` with upper bounds on integer fields (`steps=1000`) or lengths of string fields (`image=...`): the
    limits a server is configured with, in the schema it validates with and publishes."""
    fields: dict[str, Any] = {}
    for name, limit in limits.items():
        info = model.model_fields[name]
        optional = info.default is None
        if info.annotation in (str, str | None):
            kind: Any = Annotated[str, Field(max_length=limit)]
        else:
            kind = Int(_lower_bound(info), limit)
        fields[name] = (kind | None if optional else kind, Field(info.default, description=info.description))
    return create_model(model.__name__, __base__=model, **fields)


def _lower_bound(info: Any) -> int | None:
    """The `ge` of a field declared `Int(ge, ...)` (possibly `| None`)."""
    found = list(info.metadata)
    for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
        found += getattr(arg, "__metadata__", ())
    while found:
        meta = found.pop()
        if getattr(meta, "ge", None) is not None:
            return meta.ge
        found += getattr(meta, "metadata", [])
    return None


def message_schemas(client: tuple[type[BaseModel], ...] = CLIENT_MESSAGES) -> dict[str, Any]:
    """JSON Schemas of every message type, keyed by direction and `type` (what `GET /v1/stream/messages` serves)."""

    def one(model: type[BaseModel]) -> dict[str, Any]:
        return model.model_json_schema(mode="validation")

    return {
        "description": "Messages of the /v1/stream websocket (DESIGN.md). Text messages are JSON objects with a "
        "`type`; media (the fMP4 init segment and segments, JPEG frames) are binary messages.",
        "client_to_server": {m.model_fields["type"].annotation.__args__[0]: one(m) for m in client},
        "server_to_client": {m.model_fields["type"].annotation.__args__[0]: one(m) for m in SERVER_MESSAGES},
    }
