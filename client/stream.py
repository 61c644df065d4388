"""Async client of the `/v1/stream` websocket (DESIGN.md): start → ready → clips → done, resumed across drops.

    client = StreamClient("http://127.0.0.1:8000")
    async with contextlib.aclosing(client.stream(num_frames=33, steps=4)) as events:
        async for event in events:
            ...  # Ready, then Clip..., then Done

`await client.stop()` (from any task) asks the server to stop; the iterator then ends with `Done`.
Leaving the loop early closes the connection, which cancels the session on the server.

A connection that drops (no `done`, no `error` message) is resumed transparently (DESIGN.md, item 7): the client
reconnects with backoff, sends `{"type":"resume","token":...,"from_frame":k}` (k: the frames it has) and goes on,
so the caller sees one `Ready`, contiguous clips without duplicates, then `Done`, as from an uninterrupted stream.
`StreamClient.resume(token, from_frame)` continues a session from another process (`Ready.resume_token`).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ._util import auth_headers, encode_image, stream_url
from .errors import ClientError, StreamError, TransportError
from .protocol import ServerMessage

__all__ = ["Clip", "Done", "Event", "Ready", "ReconnectHook", "StreamClient"]

# on_reconnect(attempt, delay_s, error): called before each reconnection attempt (attempt counts from 1).
ReconnectHook = Callable[[int, float, ClientError], None]


@dataclass(frozen=True)
class Ready:
    """The session started. `init_segment` is the fMP4 init segment (ftyp+moov); None for jpeg.

    `resume_token` resumes the session after a disconnect (`StreamClient.resume`); None from a server without
    resume. `first_frame`: the first frame of the stream that follows (0 for a new stream, k for a resume)."""

    session_id: str
    width: int
    height: int
    fps: float
    chunk_frames: int
    format: str
    mime: str | None
    init_segment: bytes | None = field(default=None, repr=False)
    resume_token: str | None = field(default=None, repr=False)
    first_frame: int = 0


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


class _Dropped(Exception):
    """A connection ended without `done` or a final error: the session may be resumed. `error` says how."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Session:
    """What one logical stream knows across its connections."""

    first: dict[str, Any]  # the first message of the first connection: start, or resume
    have: int  # frames the caller has been given: every frame before `have`
    token: str | None = None  # what resumes it
    ready: Ready | None = None  # the Ready the caller got
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set by stop(): cut a backoff short


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
        self._sessions: set[_Session] = set()  # running streams, connected or between connections
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
        prompt: str | None = None,
        guidance_scale: float | None = None,
        resume: bool = True,
        max_reconnects: int | None = 10,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        on_reconnect: ReconnectHook | None = None,
    ) -> AsyncIterator[Event]:
        """Yield `Ready`, the `Clip`s, then `Done`. Server errors raise `StreamError`.

        `image`: PNG/JPEG bytes or a path (sent base64); `num_frames` None streams until `stop()` (or the server's
        max_frames). `pace`: "realtime" (a viewer at the model's fps) or "max" (as fast as spare capacity allows).
        `prompt`, `guidance_scale`: text-conditioned models (`GET /v1/models` says `text`); `set_prompt` changes the
        prompt of the running stream.
        Unset fields take the server's defaults. Each clip is acknowledged when the caller asks for the next event,
        so a caller that stops iterating makes the server pause the stream (flow control).

        Resume (`resume=True`): a connection that drops after `Ready` (closed or reset without a `done` or `error`
        message, a network error, a failed reconnect) is reconnected after a backoff of `backoff_s` doubling up
        to `max_backoff_s` (times a random factor in [0.5, 1]; back to `backoff_s` once a resumed connection
        delivers a clip), at most `max_reconnects` times over the whole stream (None: no limit), and the session
        is resumed from the first frame not yet yielded. Reconnections do not show in the events: there is still
        one `Ready` (the first connection's; a resend of the init segment is checked to be the same), and the
        clips stay contiguous (a resent clip that overlaps frames already yielded is trimmed, jpeg, or skipped).
        `on_reconnect(attempt, delay_s, error)` is called before each attempt, to report it. Server errors are
        final and raise at once (`expired`: the session is gone; `replaced`: another connection resumed it;
        `invalid_request`, `unauthorized`, `slow_consumer`, `internal`), except `server_busy` answering a resume,
        which is retried. When the attempts run out, the last error is raised. A stop requested while the
        connection is down makes one immediate attempt to resume, stop and get `Done`.
        """
        start: dict[str, Any] = {"type": "start", "format": format, "pace": pace}
        if image is not None:
            start["image"] = encode_image(image)
        for key, value in (("seed", seed), ("sampler", sampler), ("steps", steps), ("num_frames", num_frames),
                           ("prompt", prompt), ("guidance_scale", guidance_scale)):  # fmt: skip
            if value is not None:
                start[key] = value
        events = self._run(_Session(start, 0), resume, max_reconnects, backoff_s, max_backoff_s, on_reconnect)
        async with aclosing(events):
            async for event in events:
                yield event

    async def resume(
        self,
        token: str,
        from_frame: int,
        *,
        max_reconnects: int | None = 10,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        on_reconnect: ReconnectHook | None = None,
    ) -> AsyncIterator[Event]:
        """Continue a session started elsewhere (e.g. by a process that has since died): yield the server's `Ready`
        (`first_frame` == `from_frame`, the init segment again for fmp4), the clips from frame `from_frame` on,
        then `Done`. `token`: the session's `Ready.resume_token`; `from_frame`: the first frame the caller does
        not have. Drops are resumed again, as in `stream`; `expired` (the session is gone) raises StreamError.
        """
        if isinstance(from_frame, bool) or not isinstance(from_frame, int) or from_frame < 0:
            raise ValueError(f"from_frame must be a non-negative integer, got {from_frame!r}")
        first = {"type": "resume", "token": token, "from_frame": from_frame}
        session = _Session(first, from_frame, token)
        events = self._run(session, True, max_reconnects, backoff_s, max_backoff_s, on_reconnect)
        async with aclosing(events):
            async for event in events:
                yield event

    async def set_prompt(self, text: str, recache: bool = False) -> None:
        """Text-conditioned models: the running stream(s) take `text` as their prompt from a later clip on
        (`recache`: the cached frames are rewritten under it too). The server allows one change per
        `min_prompt_interval_s`; a faster one ends the stream with `invalid_request`."""
        message = json.dumps({"type": "prompt", "text": text, "recache": recache})
        for ws in list(self._active):
            try:
                await ws.send(message)
            except ConnectionClosed:
                pass

    async def stop(self) -> None:
        """Ask the server to stop the running stream(s); each then ends with `Done`. Idempotent.

        Called while no stream is running, it stops the next one as soon as it starts.
        """
        self._stop_requested = True
        for session in list(self._sessions):
            session.wake.set()
        for ws in list(self._active):
            await self._send_stop(ws)

    # ---- one logical stream over one or more connections ------------------------------------------------------

    async def _run(
        self,
        session: _Session,
        resume: bool,
        max_reconnects: int | None,
        backoff_s: float,
        max_backoff_s: float,
        on_reconnect: ReconnectHook | None,
    ) -> AsyncIterator[Event]:
        self._sessions.add(session)
        attempts = 0  # reconnections so far
        failures = 0  # reconnections since the last one that delivered a clip: the backoff exponent
        stop_retried = False
        message = session.first
        try:
            while True:
                progress = False
                try:
                    async with aclosing(self._connection(session, message)) as events:  # leaving early closes it
                        async for event in events:
                            if isinstance(event, Clip):
                                progress = True
                            yield event
                    return  # done
                except _Dropped as dropped:
                    error = dropped.error
                    if not resume or session.token is None:
                        raise error from dropped.__cause__
                    if progress:
                        failures = 0
                    if self._stop_requested:  # the caller wants it over: one quick try for a clean Done
                        if stop_retried:
                            raise error from dropped.__cause__
                        stop_retried, delay = True, 0.0
                    else:
                        delay = min(max_backoff_s, backoff_s * 2.0**failures) * random.uniform(0.5, 1.0)
                    if max_reconnects is not None and attempts >= max_reconnects:
                        raise _gave_up(error, attempts) from dropped.__cause__
                    attempts += 1
                    failures += 1
                    if on_reconnect is not None:
                        on_reconnect(attempts, delay, error)
                    if delay > 0:
                        session.wake.clear()
                        try:
                            await asyncio.wait_for(session.wake.wait(), delay)
                        except asyncio.TimeoutError:
                            pass
                    message = {"type": "resume", "token": session.token, "from_frame": session.have}
        finally:
            self._sessions.discard(session)
            if not self._sessions:
                self._stop_requested = False

    async def _connection(self, session: _Session, message: dict[str, Any]) -> AsyncIterator[Event]:
        """One connection: send `message` (start or resume), read ready and clips. Raises _Dropped when the
        connection is lost without a final word from the server, StreamError on a final error."""
        resuming = message["type"] == "resume"
        try:
            ws = await self._connect()
        except TransportError as exc:
            if session.token is None:  # the first connection of a new stream: nothing to resume
                raise
            raise _Dropped(exc) from exc
        try:
            try:
                await ws.send(json.dumps(message))
                self._active.add(ws)  # only now may stop() write to it: the start/resume must go first
                if self._stop_requested:
                    await self._send_stop(ws)
            except ConnectionClosed:  # refused before the first message went out (e.g. unauthorized): read why below
                pass
            try:
                ready_msg = await self._recv_json(ws)
            except StreamError as exc:
                if resuming and exc.code == "server_busy":  # a resume is admitted like a new session: try later
                    raise _Dropped(exc) from exc
                raise
            if ready_msg.get("type") != "ready":
                raise StreamError("protocol_error", f"expected a ready message, got {ready_msg.get('type')!r}")
            fmt = ready_msg.get("format", message.get("format", "fmp4"))
            init = await self._recv_bytes(ws) if fmt == "fmp4" else None
            first_frame = int(ready_msg.get("first_frame", session.have if resuming else 0))
            if first_frame > session.have:
                raise StreamError("protocol_error", f"the stream resumed at frame {first_frame}, not {session.have}")
            token = ready_msg.get("resume_token") or session.token
            ready = Ready(ready_msg["session_id"], ready_msg["width"], ready_msg["height"], ready_msg["fps"],
                          ready_msg["chunk_frames"], fmt, ready_msg.get("mime"), init, token,
                          session.have)  # fmt: skip
            if session.ready is None:
                session.ready, session.token = ready, token
                yield ready
            else:
                self._check_resumed(session.ready, ready)
                session.token = token  # the server may have renewed it
            while True:
                msg = await self._recv_json(ws)
                kind = msg.get("type")
                if kind == "clip":
                    first, count = int(msg["first_frame"]), int(msg["num_frames"])
                    media = [await self._recv_bytes(ws) for _ in range(1 if fmt == "fmp4" else count)]
                    end = first + count
                    if first > session.have:
                        raise StreamError("protocol_error", f"frames {session.have}..{first - 1} are missing")
                    if end > session.have:  # else: a resent clip the caller already has
                        if first < session.have:  # a resent clip that overlaps what the caller has: its tail
                            if fmt == "fmp4":  # a segment cannot be cut here: the server trims it
                                raise StreamError("protocol_error", f"a resent segment starts at {first}")
                            media = media[session.have - first :]
                            first, count = session.have, end - session.have
                        ahead = msg.get("ahead_ms")
                        session.have = end
                        yield Clip(msg["index"], first, count, float(msg.get("gen_ms", 0.0)), media,
                                   None if ahead is None else float(ahead))  # fmt: skip
                    await self._send_ack(ws, end)
                elif kind == "done":
                    yield Done(int(msg["frames"]), msg.get("reason"))
                    return
                else:
                    raise StreamError("protocol_error", f"unexpected message type {kind!r}")
        except StreamError as exc:
            if exc.code == "disconnected":
                raise _Dropped(exc) from exc
            raise
        finally:
            self._active.discard(ws)
            self._stopped.discard(ws)
            await ws.close()

    @staticmethod
    def _check_resumed(ready: Ready, again: Ready) -> None:
        if again.session_id != ready.session_id:
            raise StreamError("protocol_error", f"resumed session {again.session_id!r}, not {ready.session_id!r}")
        if again.format != ready.format:
            raise StreamError("protocol_error", f"the resumed stream is {again.format}, not {ready.format}")
        if again.init_segment != ready.init_segment:  # the caller has the first one; segments must fit it
            raise StreamError("protocol_error", "the resumed stream's init segment differs from the first")

    # ---- the wire ---------------------------------------------------------------------------------------------

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
        except OSError as exc:
            raise StreamError("disconnected", f"connection lost ({exc or type(exc).__name__})") from exc

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
        if data.get("type") == "error":  # whatever its code: a newer server's errors are errors too
            raise StreamError(str(data.get("code", "internal")), str(data.get("message", "")), await self._closed(ws))
        try:
            ServerMessage.validate_python(data)  # the protocol's schema (ca2vdm.client.protocol)
        except ValidationError as exc:
            raise StreamError("protocol_error", f"a {data.get('type')!r} message that breaks the protocol: "
                              f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc  # fmt: skip
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


def _gave_up(error: ClientError, attempts: int) -> ClientError:
    note = f" (gave up after {attempts} reconnection attempt{'s' if attempts != 1 else ''})"
    if isinstance(error, StreamError):
        return StreamError(error.code, error.message + note, error.close_code)
    return TransportError(str(error) + note)
