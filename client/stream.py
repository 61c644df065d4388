"""Async client of the `/v1/stream` websocket (DESIGN.md): start → ready → clips → done.

    client = StreamClient("http://127.0.0.1:8000")
    async with contextlib.aclosing(client.stream(num_frames=33, steps=4)) as events:
        async for event in events:
            ...  # Ready, then Clip..., then Done

`await client.stop()` (from any task) asks the server to stop; the iterator then ends with `Done`.
Leaving the loop early closes the connection, which cancels the session on the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ._util import auth_headers, encode_image, stream_url
from .errors import StreamError, TransportError

__all__ = ["Clip", "Done", "Event", "Ready", "StreamClient"]


@dataclass(frozen=True)
class Ready:
    """The session started. `init_segment` is the fMP4 init segment (ftyp+moov); None for jpeg."""

    session_id: str
    width: int
    height: int
    fps: float
    chunk_frames: int
    format: str
    mime: str | None
    init_segment: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Clip:
    """One finished chunk. `media`: one fMP4 media segment, or `num_frames` JPEGs."""

    index: int
    first_frame: int
    num_frames: int
    gen_ms: float
    media: list[bytes] = field(repr=False)
    ahead_ms: float | None = None  # live streams: how long before the viewer needs it the clip was out (< 0: late)


@dataclass(frozen=True)
class Done:
    """The stream ended normally (requested frame count reached, or stopped); `frames` were sent in all.
    `reason` is "max_frames" when an unbounded stream reached the server's limit."""

    frames: int
    reason: str | None = None


Event = Ready | Clip | Done


class StreamClient:
    """Streams generated video from a ca2vdm server. `url`: http[s]://, ws[s]:// or host:port."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        open_timeout: float = 10.0,
        close_timeout: float = 10.0,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.url = stream_url(url)
        self.api_key = api_key
        self.open_timeout, self.close_timeout, self.max_message_bytes = open_timeout, close_timeout, max_message_bytes
        self._active: set[ClientConnection] = set()
        self._stopped: set[ClientConnection] = set()
        self._stop_requested = False

    async def stream(
        self,
        *,
        image: bytes | str | Path | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        num_frames: int | None = None,
        format: str = "fmp4",
        pace: str = "realtime",
    ) -> AsyncIterator[Event]:
        """Yield `Ready`, the `Clip`s, then `Done`. Server errors raise `StreamError`.

        `image`: PNG/JPEG bytes or a path (sent base64); `num_frames` None streams until `stop()` (or the server's
        max_frames). `pace`: "realtime" (a viewer at the model's fps) or "max" (as fast as spare capacity allows).
        Unset fields take the server's defaults. Each clip is acknowledged when the caller asks for the next event,
        so a caller that stops iterating makes the server pause the stream (flow control).
        """
        start: dict[str, Any] = {"type": "start", "format": format, "pace": pace}
        if image is not None:
            start["image"] = encode_image(image)
        for key, value in (("seed", seed), ("sampler", sampler), ("steps", steps), ("num_frames", num_frames)):
            if value is not None:
                start[key] = value
        ws = await self._connect()
        self._active.add(ws)
        try:
            try:
                await ws.send(json.dumps(start))
                if self._stop_requested:
                    await self._send_stop(ws)
            except ConnectionClosed:  # refused before the start went out (e.g. unauthorized): read why below
                pass
            ready = await self._recv_json(ws)
            if ready.get("type") != "ready":
                raise StreamError("protocol_error", f"expected a ready message, got {ready.get('type')!r}")
            fmt = ready.get("format", format)
            init = await self._recv_bytes(ws) if fmt == "fmp4" else None
            yield Ready(ready["session_id"], ready["width"], ready["height"], ready["fps"], ready["chunk_frames"],
                        fmt, ready.get("mime"), init)  # fmt: skip
            while True:
                msg = await self._recv_json(ws)
                kind = msg.get("type")
                if kind == "clip":
                    count = 1 if fmt == "fmp4" else int(msg["num_frames"])
                    media = [await self._recv_bytes(ws) for _ in range(count)]
                    ahead = msg.get("ahead_ms")
                    yield Clip(msg["index"], msg["first_frame"], msg["num_frames"], float(msg.get("gen_ms", 0.0)),
                               media, None if ahead is None else float(ahead))  # fmt: skip
                    await self._send_ack(ws, int(msg["first_frame"]) + int(msg["num_frames"]))
                elif kind == "done":
                    yield Done(int(msg["frames"]), msg.get("reason"))
                    return
                else:
                    raise StreamError("protocol_error", f"unexpected message type {kind!r}")
        finally:
            self._active.discard(ws)
            self._stopped.discard(ws)
            if not self._active:
                self._stop_requested = False
            await ws.close()

    async def stop(self) -> None:
        """Ask the server to stop the running stream(s); each then ends with `Done`. Idempotent.

        Called while no stream is running, it stops the next one as soon as it starts.
        """
        self._stop_requested = True
        for ws in list(self._active):
            await self._send_stop(ws)

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                additional_headers=auth_headers(self.api_key),
                open_timeout=self.open_timeout,
                close_timeout=self.close_timeout,
                max_size=self.max_message_bytes,
                compression=None,  # media is already compressed
            )
        except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise TransportError(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc

    async def _send_stop(self, ws: ClientConnection) -> None:
        if ws in self._stopped:
            return
        self._stopped.add(ws)
        try:
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:  # already finished
            pass

    async def _send_ack(self, ws: ClientConnection, frames: int) -> None:
        try:
            await ws.send(json.dumps({"type": "ack", "frames": frames}))
        except ConnectionClosed:  # the server has finished: its last messages are still to be read
            pass

    async def _recv(self, ws: ClientConnection) -> str | bytes:
        try:
            return await ws.recv()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None and exc.rcvd.reason else "no reason given"
            raise StreamError("disconnected", f"connection closed before done ({reason})", code) from exc

    async def _recv_json(self, ws: ClientConnection) -> dict[str, Any]:
        msg = await self._recv(ws)
        if isinstance(msg, bytes):
            raise StreamError("protocol_error", "expected a JSON message, got binary data")
        return await self._parse(ws, msg)

    async def _recv_bytes(self, ws: ClientConnection) -> bytes:
        msg = await self._recv(ws)
        if isinstance(msg, bytes):
            return msg
        data = await self._parse(ws, msg)
        raise StreamError("protocol_error", f"expected media data, got a {data.get('type')!r} message")

    async def _parse(self, ws: ClientConnection, text: str) -> dict[str, Any]:
        """Decode a JSON message; an `error` message raises StreamError once the server has closed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StreamError("protocol_error", f"bad JSON from the server: {exc}") from exc
        if not isinstance(data, dict):
            raise StreamError("protocol_error", "a server message is not a JSON object")
        if data.get("type") == "error":
            raise StreamError(str(data.get("code", "internal")), str(data.get("message", "")), await self._closed(ws))
        return data

    async def _closed(self, ws: ClientConnection) -> int | None:
        """The close code the server sends after an error (waits for it, briefly)."""

        async def drain() -> None:
            while True:
                await ws.recv()

        try:
            await asyncio.wait_for(drain(), self.close_timeout)
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        return ws.close_code
