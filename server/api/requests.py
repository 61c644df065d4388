"""What a client sends, turned into engine parameters without letting one client stall the others.

The event loop serves every connection, so it never parses, decodes or resizes anything whose cost a client
controls: a start message or request body larger than `INLINE_BYTES`, and every condition image (a 40 KB PNG can
declare 16 million pixels), go to a small pool of threads (`request_workers`). At most `max_pending_requests` such
jobs are in or waiting for the pool; beyond that a request is refused at once as busy, so a flood of large messages
costs a bounded share of the machine; the pool's threads run at a lower priority than the engine. Every error becomes a
`Reject` with the API's error code and a short reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import secrets
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.media import load_image
from ca2vdm.server.model.loader import Pipeline
from ca2vdm.server.model.prompt import Prompt

from .schemas import RequestModels, ResumeMessage, describe, request_models
from .settings import Settings

INLINE_BYTES = 64 * 2**10  # JSON at most this long is parsed on the event loop (well under a millisecond)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Reject(Exception):
    """A request the server refuses: `code` is the API's error code (invalid_request, server_busy, ...), `status`
    the HTTP status for REST (422: the body does not match its schema; 400: it does, but asks for too much)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Strict base64 (a data: URL prefix is accepted); ValueError with a reason otherwise."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:
        raise ValueError(f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not valid base64: {exc}") from exc
    if len(raw) > max_bytes:
        raise ValueError(f"image is larger than {max_bytes} bytes")
    return raw


def lower_thread_priority(nice: int = 10) -> None:
    """Give the calling thread (and threads it starts) less CPU than the engine when they compete: decoding what a
    client sent, or encoding a background job, must not slow live generation. Linux schedules threads separately,
    so this is per thread; elsewhere it does nothing."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class RequestDecoder:
    def __init__(self, settings: Settings, pipe: Pipeline,
                 encode: Callable[[str], Awaitable[Any]] | None = None) -> None:  # fmt: skip
        """`encode`: a prompt's caption features (`.y`, `.mask`), for text models; default: the pipeline's text
        encoder, run on this decoder's threads (a cluster's ingress asks a replica)."""
        self.settings, self.pipe = settings, pipe
        self._encode = encode
        # the same models as the published schemas (a video-prediction model's take no prompt)
        self.models: RequestModels = request_models(settings, takes_text=pipe.config.takes_text)
        self._pool = ThreadPoolExecutor(max_workers=settings.request_workers, thread_name_prefix="ca2vdm-request",
                                        initializer=lower_thread_priority)  # fmt: skip
        self._pending = 0  # jobs in or waiting for the pool (event loop only)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _offload(self, fn: Callable[..., T], *args: object, bounded: bool = True) -> T:
        """`fn(*args)` on the request threads; refused as busy beyond `max_pending_requests` unless not `bounded`
        (work whose callers bound it themselves)."""
        if bounded and self._pending >= self.settings.max_pending_requests:
            raise Reject("server_busy", "too many large requests in progress; retry in a few seconds")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    async def _parse(self, model: type[M], text: str | bytes) -> M:
        if len(text) <= INLINE_BYTES:
            return _validate(model, text)
        return await self._offload(_validate, model, text)

    async def _image(self, data: str | None) -> torch.Tensor | None:
        if data is None:
            return None
        s = self.settings
        return await self._offload(_decode_image, data, self.pipe.frame_size, s.max_image_bytes, s.max_image_pixels,
                                   s.max_image_aspect)  # fmt: skip

    async def stream_request(self, text: str) -> tuple[SessionParams, bool] | ResumeMessage:
        """A websocket's first message: `start` -> (engine parameters, whether num_frames was capped at max_frames);
        `resume` -> the message."""
        msg = (await self._parse(self.models.first, text)).root
        if isinstance(msg, ResumeMessage):
            return msg
        prompt = await self.prompt(msg.prompt, msg.guidance_scale)
        image = await self._image(msg.image)
        capped = msg.num_frames is None
        num_frames = self.settings.max_frames if capped else msg.num_frames
        params = self._params(image, msg.seed, msg.sampler, msg.steps, num_frames, msg.format, msg.pace, prompt)
        return params, capped

    async def job_params(self, body: bytes) -> SessionParams:
        """A POST /v1/videos body -> engine parameters (a background session of raw frames)."""
        msg = await self._parse(self.models.video, body)
        prompt = await self.prompt(msg.prompt, msg.guidance_scale)
        image = await self._image(msg.image)
        return self._params(image, msg.seed, msg.sampler, msg.steps, msg.num_frames, "raw", "max", prompt)

    async def prompt(self, text: str | None, guidance_scale: float | None = None, *, queued: bool = False
                     ) -> Prompt | None:  # fmt: skip
        """A prompt and guidance scale -> the engine's `Prompt` (None: no prompt). A model that takes no text
        refuses both; guidance needs a prompt; the scale defaults to the model's. `queued`: wait for the encoder
        instead of being refused as busy when many requests are in progress (a running stream's prompt change, a
        queued job: their own limits bound them, and a refusal would end the stream or fail the job)."""
        config = self.pipe.config
        if not config.takes_text:
            if text is not None or guidance_scale is not None:
                raise Reject("invalid_request", f"model {self.pipe.name} is not text-conditioned: it takes no "
                             "prompt or guidance_scale")  # fmt: skip
            return None
        if text is None:
            if guidance_scale is not None and guidance_scale > 1:
                raise Reject("invalid_request", "guidance_scale needs a prompt")
            return None
        if not text.strip():
            raise Reject("invalid_request", "prompt is empty")
        text_encoder = getattr(self.pipe, "text", None)
        if self._encode is None and text_encoder is None:
            raise Reject("internal", "this server has no text encoder loaded (--text-encoder)")
        try:
            if self._encode is not None:  # a cluster's ingress: a replica encodes
                features = await self._encode(text)
            else:
                features = await self._offload(text_encoder.encode, text, bounded=not queued)
        except ValueError as exc:
            raise Reject("invalid_request", str(exc)) from exc
        scale = config.guidance_scale if guidance_scale is None else guidance_scale
        return Prompt(text, features.y, features.mask, scale)

    def _params(self, image: torch.Tensor | None, seed: int | None, sampler: str | None, steps: int | None,
                num_frames: int | None, fmt: str, pace: str,
                prompt: Prompt | None = None) -> SessionParams:  # fmt: skip
        s = self.settings
        sampler = sampler or self.pipe.config.default_sampler
        if steps is None:  # the model's default, within what this server allows
            steps = min(self.pipe.default_steps(sampler), s.max_steps)
        if steps > s.max_steps:
            raise Reject("invalid_request", f"steps must be <= {s.max_steps}")
        if num_frames is not None and num_frames > s.max_frames:
            raise Reject("invalid_request", f"num_frames must be <= {s.max_frames}")
        seed = seed if seed is not None else secrets.randbelow(2**31)
        try:
            return SessionParams(image=image, seed=seed, sampler=sampler, steps=steps, num_frames=num_frames,
                                 format=fmt, pace=pace, prompt=prompt)  # fmt: skip
        except ValueError as exc:
            raise Reject("invalid_request", str(exc)) from exc


def _validate(model: type[M], text: str | bytes) -> M:
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise Reject("invalid_request", f"bad {_noun(model)}: {describe(exc)}", status=422) from exc


def _noun(model: type[BaseModel]) -> str:
    return "request" if model.__name__ == "VideoRequest" else "start message"


def _decode_image(data: str, size: tuple[int, int], max_bytes: int, max_pixels: int, max_aspect: float) -> torch.Tensor:
    try:
        return load_image(decode_base64(data, max_bytes), size=size, max_pixels=max_pixels, max_aspect=max_aspect)
    except ValueError as exc:
        raise Reject("invalid_request", str(exc)) from exc
