"""The consumer's side of a session: `SessionHandle`, an async iterator of clips, and the errors it raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .session import Clip, Prompt, Session, SessionState

if TYPE_CHECKING:
    from .engine import Engine


class ServerBusy(RuntimeError):
    """No room: the session's waiting queue is full."""


class SessionFailed(RuntimeError):
    """The session ended (or a resume was refused) with an error; `code` is the API's error code (internal,
    slow_consumer, server_busy, replaced; for a resume also invalid_request and expired)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StreamInfo:
    session_id: str
    width: int
    height: int
    fps: int
    chunk_frames: int
    format: str
    mime: str | None
    init_segment: bytes | None
    resume_token: str | None = None  # resumable sessions: what a reconnecting consumer presents
    first_frame: int = 0  # the first frame this handle delivers (0, or where a resume starts)


DONE = object()  # the event that ends a handle's iteration


class SessionHandle:
    """Clips arrive in order (`async for clip in handle`); `cancel()` ends the session.

    Flow control: a clip counts against the session's budget (`max_pending_clips`, `max_pending_bytes`) until it is
    acknowledged. With `auto_ack` (in-process consumers) taking a clip from the iterator acknowledges it; a remote
    consumer (the websocket) passes its client's acknowledgements on with `ack(frames)`.
    """

    def __init__(self, engine: Engine, session: Session, info: StreamInfo, loop: asyncio.AbstractEventLoop,
                 auto_ack: bool = True) -> None:  # fmt: skip
        self._engine, self._session, self.info = engine, session, info
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.auto_ack = auto_ack

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def session(self) -> Session:
        return self._session

    @property
    def requested_frames(self) -> int | None:
        """The session's `num_frames` (None: until stopped)."""
        return self._session.params.num_frames

    @property
    def state(self) -> SessionState:
        return self._session.state

    def deliver(self, event: object) -> None:
        """Hand an event (a Clip, SessionFailed or DONE) to the consumer's loop; any thread."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def ack(self, frames: int) -> None:
        """The consumer has every frame before `frames`: those clips leave the session's budget."""
        self._session.ack(frames)
        self._engine.wake()

    def cancel(self) -> None:
        """End the session (if this handle is still its consumer's: see `Engine.cancel`)."""
        self._engine.cancel(self._session, handle=self)

    def set_prompt(self, prompt: Prompt, recache: bool = False) -> None:
        """Condition the session on `prompt` from its next clip on (see `Engine.set_prompt`)."""
        self._engine.set_prompt(self._session, prompt, recache, handle=self)

    def end(self) -> None:
        """End this handle's iteration (its consumer left; the session itself goes on, detached)."""
        self.deliver(DONE)

    def detach(self) -> None:
        """The consumer left without stopping: the engine keeps the session for a resume (resumable sessions; others
        are cancelled)."""
        if self.info.resume_token is None:
            self.cancel()
        else:
            self._engine.detach(self)

    async def __aiter__(self) -> AsyncIterator[Clip]:
        while True:
            event = await self._queue.get()
            if isinstance(event, Clip):
                if self.auto_ack:
                    self.ack(event.end_frame)
                yield event
            elif isinstance(event, SessionFailed):
                raise event
            else:  # DONE
                return
