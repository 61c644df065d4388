"""WS /v1/stream: the streaming protocol of DESIGN.md.

start → ready (+ init segment for fmp4) → per clip: clip JSON then its media → done, close 1000.
Errors: an `error` message, then close 1008 (invalid_request, unauthorized), 1013 (server_busy) or 1011
(internal). A client that stops reading pauses its session (the engine's backpressure); a disconnect or a
`stop` cancels it and frees its cache at once.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed, SessionHandle
from ca2vdm.server.engine.session import SessionParams

from .auth import key_is_valid
from .schemas import StartMessage, build_params
from .settings import Settings

log = logging.getLogger("ca2vdm.api")
router = APIRouter()

_CLOSE = {"invalid_request": 1008, "unauthorized": 1008, "server_busy": 1013, "internal": 1011}


class _Reject(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def session_params(msg: StartMessage, engine: Engine, settings: Settings) -> SessionParams:
    try:
        return build_params(msg.image, msg.seed, msg.sampler, msg.steps, msg.num_frames, msg.format, engine, settings)
    except ValueError as exc:
        raise _Reject("invalid_request", str(exc)) from exc


async def _fail(ws: WebSocket, code: str, message: str) -> None:
    try:
        await ws.send_json({"type": "error", "code": code, "message": message})
        await ws.close(_CLOSE[code])
    except (WebSocketDisconnect, RuntimeError):  # the client is already gone
        pass


async def _read_start(ws: WebSocket, settings: Settings) -> StartMessage:
    try:
        message = await asyncio.wait_for(ws.receive(), timeout=settings.start_timeout_s)
    except TimeoutError as exc:
        raise _Reject("invalid_request", f"no start message within {settings.start_timeout_s:g} s") from exc
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise _Reject("invalid_request", "the first message must be a JSON text message")
    if len(text) > settings.max_message_bytes:
        raise _Reject("invalid_request", f"message larger than {settings.max_message_bytes} bytes")
    try:
        return StartMessage.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise _Reject("invalid_request", f"bad start message: {exc}") from exc


async def _send_clips(ws: WebSocket, handle: SessionHandle) -> int:
    frames = 0
    async for clip in handle:
        await ws.send_json({"type": "clip", "index": clip.index, "first_frame": clip.first_frame,
                            "num_frames": clip.num_frames, "gen_ms": round(clip.gen_ms, 1)})  # fmt: skip
        for media in clip.media:
            await ws.send_bytes(media)
        frames += clip.num_frames
    return frames


async def _watch_client(ws: WebSocket, handle: SessionHandle) -> None:
    """Cancel the session on `stop` or disconnect; other messages are ignored."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            handle.cancel()
            return
        if message.get("text"):
            try:
                if json.loads(message["text"]).get("type") == "stop":
                    handle.cancel()
                    return
            except (json.JSONDecodeError, AttributeError):
                continue


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    settings: Settings = ws.app.state.settings
    engine: Engine = ws.app.state.engine
    await ws.accept()
    if not key_is_valid(settings, ws.headers.get("authorization"), ws.query_params.get("api_key")):
        await _fail(ws, "unauthorized", "missing or wrong API key")
        return
    try:
        params = session_params(await _read_start(ws, settings), engine, settings)
        handle = await engine.start_session(params)
    except _Reject as exc:
        await _fail(ws, exc.code, str(exc))
        return
    except ServerBusy as exc:
        await _fail(ws, "server_busy", str(exc))
        return
    except WebSocketDisconnect:
        return
    info = handle.info
    watcher = asyncio.create_task(_watch_client(ws, handle))
    try:
        await ws.send_json({"type": "ready", "session_id": info.session_id, "width": info.width, "height": info.height,
                            "fps": info.fps, "chunk_frames": info.chunk_frames, "format": info.format,
                            "mime": info.mime})  # fmt: skip
        if info.init_segment is not None:
            await ws.send_bytes(info.init_segment)
        frames = await _send_clips(ws, handle)
        await ws.send_json({"type": "done", "frames": frames})
        await ws.close(1000)
    except SessionFailed as exc:
        await _fail(ws, exc.code, str(exc))
    except (WebSocketDisconnect, RuntimeError):  # client gone mid-stream: the session is cancelled below
        pass
    finally:
        handle.cancel()
        watcher.cancel()
