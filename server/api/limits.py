"""Limits on what a connection may cost before the application sees it, and logs that keep secrets out.

- `BodyLimit` (ASGI middleware): an address shut out by the `ClientGuard` gets 429 at once; a request body larger
  than `max_body_bytes` is refused with 413 from its Content-Length, or as soon as the bytes read pass the limit
  (a strike for the address), and a body that stalls longer than `body_timeout_s` between parts is refused with 408:
  nothing is buffered beyond the limit, however the client sends.
- `header_timeout_protocol`: uvicorn's HTTP protocol with a deadline for each request's headers. uvicorn closes idle
  keep-alive connections, but a client that sends a request's headers a byte at a time (slowloris) is otherwise
  held forever.
- `RedactKeys` (logging filter): `api_key=...` in a logged URL becomes `api_key=REDACTED`; `RateLimitLogs`: a
  flood of one kind of log line is thinned out and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .clients import ClientGuard


class BodyLimit:
    """Reads (at most `max_bytes` of) each request body itself, then hands the app the whole of it: the app never
    sees a body over the limit, and the limit holds whatever Content-Length says or however slowly it comes."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, guard: ClientGuard | None = None) -> None:
        self.app, self.max_bytes, self.timeout_s, self.guard = app, max_bytes, timeout_s, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        if self.guard is not None and (left := self.guard.banned_for(client)):
            await _error(send, 429, "too_many_requests", "too many invalid requests from this address",
                         retry_after=int(left) + 1)  # fmt: skip
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            self._strike(client)
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
                self._strike(client)
                await _error(send, 413, "payload_too_large", f"request body larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        first: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    def _strike(self, client: str) -> None:
        if self.guard is not None:
            self.guard.strike(client)


async def _error(send: Send, status: int, code: str, message: str, retry_after: int | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(timeout_s: float, guard: ClientGuard | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools or h11, whichever it picked) with a header deadline: from the connection's
    start, and again after each response, the next request's headers must be complete within `timeout_s`. A
    connection the `guard` refuses (its address is shut out, or reconnects too fast) is closed as it opens, before
    anything is read: a flood of reconnections then costs an accept and a close each."""
    base: Any = AutoHTTPProtocol

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            self._refused = guard is not None and peer is not None and not guard.admit_connection(peer[0])
            if self._refused:
                transport.abort()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._refused:  # a refused connection never became uvicorn's
                super().connection_lost(exc)

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


class RateLimitLogs(logging.Filter):
    """At most `per_s` records per second (burst twice that) of each message template per logger; what is dropped
    is counted and reported with the next record let through. A flood of refused connections must not become a
    flood of log lines (writing them costs the event loop, and the disk)."""

    def __init__(self, per_s: float = 5.0) -> None:
        super().__init__()
        self.per_s = per_s
        self._buckets: dict[tuple[str, object], list[float]] = {}  # (logger, template) -> [tokens, last, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        tokens, last, dropped = self._buckets.get(key, [2 * self.per_s, now, 0])
        tokens = min(2 * self.per_s, tokens + (now - last) * self.per_s)
        if tokens < 1:
            self._buckets[key] = [tokens, now, dropped + 1]
            return False
        if dropped:
            record.msg = f"{record.msg} [{int(dropped)} similar messages suppressed]"
        self._buckets[key] = [tokens - 1, now, 0]
        if len(self._buckets) > 10_000:
            self._buckets.clear()
        return True


class RedactKeys(logging.Filter):
    """Replace API keys in a log record's arguments (uvicorn logs request paths with their query strings)."""

    _KEY = re.compile(r"(api_key=)[^&\s\"]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._KEY.sub(r"\1REDACTED", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._KEY.sub(r"\1REDACTED", record.msg)
        return True
