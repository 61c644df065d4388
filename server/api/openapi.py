"""The OpenAPI document, made to tell the truth (checked by a property-based fuzzer in CI: tests/api/test_openapi.py).

Every route declares the statuses it can return, each error with the one error body; request limits are schema
constraints taken from the server's settings (the same models validate requests: `schemas.request_models`); media
types are the real ones (`video/mp4`, Prometheus text); with an API key, the bearer scheme and 401 are on every route
that needs it. The websocket's messages are published as JSON Schemas at `GET /v1/stream/messages`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from .schemas import RequestModels

ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 409: "conflict", 413: "payload_too_large", 422: "invalid_request",
               429: "too_many_requests", 503: "unavailable"}  # fmt: skip

WHY = {
    400: "A request the schema allows but the server cannot serve (an image that does not decode or is too large "
    "once decoded; a list cursor that names no job)",
    401: "Missing or wrong API key",
    404: "No such video job",
    408: "The request body stalled",
    409: "The video is not completed",
    413: "The request body is larger than the server accepts",
    422: "The request does not match the schema",
    429: "Too many jobs queued or running; retry after `Retry-After` seconds",
    503: "Busy; retry after `Retry-After` seconds",
}


class ErrorDetail(BaseModel):
    code: Literal[tuple(sorted(set(ERROR_CODES.values())))]  # type: ignore[valid-type]
    message: str


class ErrorBody(BaseModel):
    """Every error response of the REST API."""

    error: ErrorDetail


class VideoJob(BaseModel):
    object: Literal["video"] = "video"
    id: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(ge=0, le=100)
    num_frames: int = Field(ge=1)
    seed: int = Field(ge=0)
    sampler: str
    steps: int = Field(ge=1)
    created_at: float
    completed_at: float | None
    error: str | None
    prompt: str | None = Field(None, description="text-conditioned models: the prompt")
    guidance_scale: float | None = Field(None, description="text-conditioned models: the guidance it runs with")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoJob]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: Literal["video"] = "video"
    deleted: Literal[True] = True


class Health(BaseModel):
    status: Literal["ok", "engine down"]


class Readiness(BaseModel):
    ready: bool


class ModelInfo(BaseModel):
    name: str
    width: int
    height: int
    fps: int
    chunk_frames: int
    max_cache_frames: int
    samplers: list[str]
    default_sampler: str
    default_steps: int
    schedules: list[dict[str, Any]]
    text: bool = Field(description="the model is text-conditioned: it takes a prompt")
    guidance_scale: float | None = Field(description="text models: the classifier-free guidance a request gets")
    max_steps: int
    max_frames: int
    realtime_capacity_sessions: int


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these error statuses (429 and 503 with their Retry-After header)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": WHY[code]}
        if code in (429, 503):
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        out[code] = entry
    return out


def document(app: FastAPI, models: RequestModels, protected: set[str], keyed: bool) -> dict[str, Any]:
    """The OpenAPI document of `app`: FastAPI's, with the request body of POST /v1/videos from `models`, every 422 as
    the error body, and (`keyed`) the bearer scheme and a 401 on the `protected` paths."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    body = models.video.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components["VideoRequest"] = body
    doc["paths"]["/v1/videos"]["post"]["requestBody"] = {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VideoRequest"}}}
    }  # fmt: skip
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in doc["paths"].items():
        for operation in item.values():
            responses = operation["responses"]
            if "422" in responses:  # FastAPI's own 422 body is not ours
                responses["422"] = {"description": WHY[422], "content": {"application/json": {"schema": error_ref}}}
            if keyed and path in protected:
                operation["security"] = [{"bearer": []}]
                responses["401"] = {"description": WHY[401], "content": {"application/json": {"schema": error_ref}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "the server's API key"}}  # fmt: skip
    return doc
