"""WS /v1/stream: the streaming protocol of DESIGN.md.

start → ready (+ init segment for fmp4) → per clip: clip JSON then its media; the client acknowledges each clip
(`ack`) → done, close 1000. Errors: an `error` message, then close 1008 (invalid_request, unauthorized,
slow_consumer), 1013 (server_busy) or 1011 (internal).

What a client can cost is bounded before anything is parsed: the handshake is refused for a foreign Origin, and for
an address shut out for its invalid requests (`ClientGuard`); a missing key ends it at once; a client address holds
at most `max_sessions_per_client` streams; the start message is parsed and its image decoded off the event loop
when large (`RequestDecoder`); after start only small control messages are accepted,
at a bounded rate; a session produces at most `max_pending_clips` clips beyond the client's acknowledgements, and one
whose client stops acknowledging is paused and then ended (the engine's slow-consumer rule). Every exception in a
handler ends in a documented error, never in a silent drop.

A connection that drops (neither `stop` nor the end of the stream) detaches its session instead of cancelling it;
a `resume` first message continues it on a new connection (DESIGN.md, item 7).
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed, SessionHandle
from ca2vdm.server.engine.stats import Histogram

from .auth import key_fingerprint, key_is_valid, offered_subprotocol, origin_allowed
from .clients import ClientGuard
from .requests import Reject, RequestDecoder
from .schemas import (
    AckMessage,
    ClipMessage,
    ControlMessage,
    DoneMessage,
    ErrorMessage,
    PromptMessage,
    ReadyMessage,
    ResumeMessage,
    StopMessage,
    describe,
    dump,
)
from .settings import Settings

log = logging.getLogger("ca2vdm.api")
router = APIRouter()

CLEAN_CLOSE = (1000, 1001)  # close codes of a client that left on purpose
CLOSE_CODES = {"invalid_request": 1008, "unauthorized": 1008, "slow_consumer": 1008, "expired": 1008,
               "replaced": 1008, "server_busy": 1013, "internal": 1011}  # fmt: skip


MOVED_CLOSE = 1012  # "service restart": the session is to be resumed (its engine replica left)


async def _close(ws: WebSocket, code: int) -> None:
    try:
        await ws.close(code)
    except (WebSocketDisconnect, RuntimeError, OSError):  # the client is already gone
        pass


async def _fail(ws: WebSocket, code: str, message: str) -> None:
    try:
        await ws.send_json(dump(ErrorMessage(code=code, message=message)))
        await ws.close(CLOSE_CODES[code])
    except (WebSocketDisconnect, RuntimeError, OSError):  # the client is already gone
        pass


async def _read_start(ws: WebSocket, settings: Settings) -> str:
    try:
        message = await asyncio.wait_for(ws.receive(), timeout=settings.start_timeout_s)
    except TimeoutError as exc:
        raise Reject("invalid_request", f"no start message within {settings.start_timeout_s:g} s") from exc
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise Reject("invalid_request", "the first message must be a JSON text message")
    return text


class _Stream:
    """One running stream: sends clips, reads the client's control messages."""

    def __init__(self, ws: WebSocket, handle: SessionHandle, settings: Settings,
                 resumed: tuple[float, Histogram] | None = None) -> None:  # fmt: skip
        self.ws, self.handle, self.settings = ws, handle, settings
        self.frames_sent = handle.info.first_frame
        self.acked = False  # has the client acknowledged anything
        self.violation: Reject | None = None
        self.left = False  # the connection dropped: the session is detached, not cancelled
        self.closed = False  # the client closed the connection on purpose: the session is cancelled
        self.resumed = resumed  # (when the resume message came, the histogram of resume latencies)
        self.last_prompt = -float("inf")  # when the client last changed the prompt
        self.prompt_task: asyncio.Task[None] | None = None  # the latest prompt change being encoded

    def end_session(self) -> None:
        """Detach the session if the client left, else cancel it (a no-op once it has ended)."""
        if self.left:
            self.handle.detach()
        else:
            self.handle.cancel()

    async def send_clips(self) -> int:
        async for clip in self.handle:
            ahead = None if clip.ahead_ms is None else round(clip.ahead_ms, 1)
            header = dump(ClipMessage(index=clip.index, first_frame=clip.first_frame, num_frames=clip.num_frames,
                                      gen_ms=round(max(0.0, clip.gen_ms), 1), ahead_ms=ahead))  # fmt: skip
            self.frames_sent = clip.end_frame  # before the sends: an ack may arrive while one still drains
            await self.ws.send_json(header)
            for media in clip.media:
                await self.ws.send_bytes(media)
            if self.resumed is not None:
                self.resumed[1].observe(time.monotonic() - self.resumed[0])
                self.resumed = None
        return self.frames_sent

    def change_prompt(self, message: PromptMessage) -> None:
        """A new prompt from the next clip on: at most one per `min_prompt_interval_s` (each costs the text encoder,
        and with `recache` a cache write), encoded off the event loop by a task of its own (so acks are read
        meanwhile), the stream's changes applied in order."""
        now = time.monotonic()
        if now - self.last_prompt < self.settings.min_prompt_interval_s:
            raise Reject("invalid_request", f"at most one prompt change per {self.settings.min_prompt_interval_s:g} s")
        self.last_prompt = now
        self.prompt_task = asyncio.create_task(self._apply_prompt(message, self.prompt_task))

    async def _apply_prompt(self, message: PromptMessage, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        decoder: RequestDecoder = self.ws.app.state.decoder
        try:
            prompt = await decoder.prompt(message.text, queued=True)  # never refused for others' load
            assert prompt is not None
            try:
                self.handle.set_prompt(prompt, recache=message.recache)
            except ValueError as exc:
                raise Reject("invalid_request", str(exc)) from exc
        except Reject as exc:
            if exc.code != "invalid_request":  # the encoder failed: the stream goes on with its prompt
                log.warning("prompt change of session %s dropped: %s", self.handle.id, exc)
                return
            self.violation = exc  # a prompt the stream cannot take ends it, as any bad message does
            self.end_session()
        except Exception:  # noqa: BLE001 - a failed change must not go unreported, nor end a healthy stream
            log.exception("prompt change of session %s failed; the stream goes on with its prompt", self.handle.id)

    async def watch_client(self) -> None:
        """`stop` and `ack` messages until the client stops or leaves; a protocol violation ends the session."""
        s = self.settings
        tokens, last = 2 * s.max_control_rate, time.monotonic()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    # a close frame of 1000/1001 is a client that meant to leave (a page closed): cancel; anything
                    # else (1006: the connection died, a network switch, a proxy's timeout) detaches for a resume
                    self.closed = message.get("code", 1006) in CLEAN_CLOSE
                    self.left = not self.closed
                    return
                now = time.monotonic()
                tokens = min(2 * s.max_control_rate, tokens + (now - last) * s.max_control_rate) - 1
                last = now
                if tokens < 0:
                    raise Reject("invalid_request", f"more than {s.max_control_rate:g} messages per second")
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if data is None or len(data) > s.max_control_bytes:
                    raise Reject("invalid_request", f"messages after start are JSON of at most {s.max_control_bytes} "
                                 "bytes")  # fmt: skip
                try:
                    control = ControlMessage.validate_json(data, strict=True)
                except ValidationError as exc:
                    raise Reject("invalid_request", f"bad message: {describe(exc)}") from exc
                if isinstance(control, StopMessage):
                    return
                if isinstance(control, PromptMessage):
                    self.change_prompt(control)
                    continue
                assert isinstance(control, AckMessage)
                if control.frames > self.frames_sent:
                    raise Reject("invalid_request", f"ack of frame {control.frames}, only {self.frames_sent} were sent")
                self.handle.ack(control.frames)
                self.acked = True
        except Reject as exc:
            self.violation = exc
        except Exception as exc:  # noqa: BLE001 - a broken watcher must end the session, never leave it unstoppable
            log.exception("websocket reader failed")
            self.violation = Reject("internal", f"reading the client failed: {type(exc).__name__}")
        finally:
            self.end_session()
            if self.left:
                self.handle.end()  # the sender stops waiting for clips


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    settings: Settings = ws.app.state.settings
    engine: Engine = ws.app.state.engine
    decoder: RequestDecoder = ws.app.state.decoder
    guard: ClientGuard = ws.app.state.clients
    client = ws.client.host if ws.client else "unknown"
    if not origin_allowed(settings, ws.headers) or guard.banned_for(client):
        await ws.close(1008)  # before accept: the handshake gets 403
        return
    await ws.accept(subprotocol=offered_subprotocol(ws.headers))
    if not key_is_valid(settings, ws.headers, ws.query_params.get("api_key"), websocket=True):
        await _fail(ws, "unauthorized", "missing or wrong API key")
        return
    owner = key_fingerprint(settings)
    try:
        with guard.hold(client):
            resumed = None
            try:
                request = await decoder.stream_request(await _read_start(ws, settings))
                if isinstance(request, ResumeMessage):
                    resumed = (time.monotonic(), engine.stats.resume_seconds)
                    handle = await engine.resume(request.token, request.from_frame, owner=owner, auto_ack=False,
                                                 client=client)  # fmt: skip
                    capped = handle.requested_frames == settings.max_frames
                else:
                    params, capped = request
                    handle = await engine.start_session(params, auto_ack=False, client=client, resumable=True,
                                                        owner=owner)  # fmt: skip
            except (Reject, SessionFailed) as exc:
                if exc.code == "moved":  # a cluster's replica holding it is leaving: resume again in a moment
                    await _close(ws, MOVED_CLOSE)
                    return
                if exc.code == "invalid_request":  # guessing tokens counts too
                    guard.strike(client)
                await _fail(ws, exc.code, str(exc))
                return
            except ServerBusy as exc:
                await _fail(ws, "server_busy", str(exc))
                return
            if strikes := await _serve(ws, handle, settings, capped, resumed):
                guard.strike(client, strikes)
    except Reject as exc:  # the address holds too many streams
        await _fail(ws, exc.code, str(exc))
    except WebSocketDisconnect:
        pass
    except Exception as exc:  # noqa: BLE001 - every failure is reported as one
        log.exception("websocket handler failed")
        await _fail(ws, "internal", f"{type(exc).__name__}: {exc}")


NEVER_READ_STRIKES = 5  # a stream ended for a client that never acknowledged a clip: not a viewer


async def _serve(ws: WebSocket, handle: SessionHandle, settings: Settings, capped: bool,
                 resumed: tuple[float, Histogram] | None = None) -> int:  # fmt: skip
    """Run the stream to its end (or until the client leaves); the strikes its client earned (protocol violations,
    not reading)."""
    stream = _Stream(ws, handle, settings, resumed)
    watcher = asyncio.create_task(stream.watch_client())
    info = handle.info
    try:
        await ws.send_json(dump(ReadyMessage(session_id=info.session_id, width=info.width, height=info.height,
                                             fps=info.fps, chunk_frames=info.chunk_frames, format=info.format,
                                             mime=info.mime, resume_token=info.resume_token,
                                             first_frame=info.first_frame)))  # fmt: skip
        if info.init_segment is not None:
            await ws.send_bytes(info.init_segment)
        frames = await stream.send_clips()
        if stream.left:
            return 0
        if stream.violation is not None:
            await _fail(ws, stream.violation.code, str(stream.violation))
            return int(stream.violation.code == "invalid_request")
        reason = "max_frames" if capped and frames >= settings.max_frames else None
        await ws.send_json(dump(DoneMessage(frames=frames, reason=reason)))
        await ws.close(1000)
    except SessionFailed as exc:
        if exc.code == "moved":  # its engine replica left (a cluster): the client resumes, the session moves
            stream.left = True
            await _close(ws, MOVED_CLOSE)
            return 0
        await _fail(ws, exc.code, str(exc))
        if exc.code == "slow_consumer":  # a client that stops reading counts against its address too
            return 1 if stream.acked else NEVER_READ_STRIKES
    except (WebSocketDisconnect, RuntimeError, OSError):  # client gone mid-stream: the session is detached below
        stream.left = not stream.closed
    finally:
        stream.end_session()
        watcher.cancel()
        if stream.prompt_task is not None:
            stream.prompt_task.cancel()
    return 0
