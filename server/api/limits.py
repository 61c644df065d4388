"""Limits on what a connection may cost before the application sees it, and logs that keep secrets out.

- `BodyLimit` (ASGI middleware): a request body larger than `max_body_bytes` is refused with 413 from its
  Content-Length, or as soon as the bytes read pass the limit, and a body that stalls longer than `body_timeout_s`
  between parts is refused with 408: nothing is buffered beyond the limit, however the client sends.
- `header_timeout_protocol`: uvicorn's HTTP protocol with a deadline for each request's headers. uvicorn closes idle
  keep-alive connections, but a client that sends a request's headers a byte at a time (slowloris) is otherwise
  held forever.
- `RedactKeys` (logging filter): `api_key=...` in a logged URL becomes `api_key=REDACTED`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol


class BodyLimit:
    """Reads (at most `max_bytes` of) each request body itself, then hands the app the whole of it: the app never
    sees a body over the limit, and the limit holds whatever Content-Length says or however slowly it comes."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _error(send, 413, "payload_too_large", f"request body larger than {self.max_bytes} bytes")
            return
        chunks, seen = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                await _error(send, 408, "request_timeout", f"no request body data for {self.timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await _error(send, 413, "payload_too_large", f"request body larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        first: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools or h11, whichever it picked) with a header deadline: from the connection's
    start, and again after each response, the next request's headers must be complete within `timeout_s`."""
    base: Any = AutoHTTPProtocol

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self._awaited = self.cycle  # headers are complete once a new cycle (request) replaces this one
            self.loop.call_later(timeout_s, self._expire, self._awaited)

        def _expire(self, awaited: object) -> None:
            upgraded = self.transport.get_protocol() is not self  # now a websocket: not ours to time
            if upgraded or self.transport.is_closing() or self.cycle is not awaited or self._awaited is not awaited:
                return
            self.transport.close()

    return HeaderTimeout


class RedactKeys(logging.Filter):
    """Replace API keys in a log record's arguments (uvicorn logs request paths with their query strings)."""

    _KEY = re.compile(r"(api_key=)[^&\s\"]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._KEY.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._KEY.sub(r"\1REDACTED", record.msg)
        return True
