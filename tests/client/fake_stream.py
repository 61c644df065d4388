"""A fake `/v1/stream` server for the client's resume tests: just enough protocol, and connections it drops.

It streams `total` frames as clip 0 = frame 0, then clips of `chunk` frames (as the real server does), in lock
step with the client's acks, so it knows exactly which frames the client has when it drops a connection. Frame
i is `b"jpeg:<i>"` (format jpeg), a clip's fmp4 segment `b"seg:<first>:<n>"` after the init segment `b"init"`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

TOKEN = "tok-secret"
SESSION = "sess-1"
INIT = b"init"


def frame(i: int) -> bytes:
    return f"jpeg:{i}".encode()


def segment(first: int, n: int) -> bytes:
    return f"seg:{first}:{n}".encode()


def clips_from(start: int, total: int, chunk: int) -> list[tuple[int, int]]:
    """(first, n) of the clips that carry frames start.. on: the regular boundaries (0 | 1..chunk | ...)."""
    out, first = [], 0
    while first < total:
        n = 1 if first == 0 else min(chunk, total - first)
        if first + n > start:
            out.append((max(first, start), first + n - max(first, start)))
        first += n
    return out


@dataclass
class FakeStream:
    total: int = 33
    chunk: int = 8
    drop_at_clips: list[int] = field(default_factory=list)  # drop mid-clip when about to send these clips (by number)
    drop_start: bool = False  # drop the start connection before ready
    drop_resumes: int = 0  # resume connections dropped before ready
    busy_resumes: int = 0  # resume connections answered server_busy
    expire: bool = False  # resumes answered `expired`
    refuse_after_drop: bool = False  # stop listening after the first drop
    overlap: int = 0  # resend from this many frames before from_frame, in clips of `chunk` from there

    # what happened
    connections: int = 0
    first_messages: list[dict[str, Any]] = field(default_factory=list)
    acked_at_drops: list[int] = field(default_factory=list)  # frames the client had acked when dropped
    resumed_from: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # protocol violations seen (the test asserts none)

    def __post_init__(self) -> None:
        self._clips_sent = 0
        self._server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeStream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    # ---- protocol ------------------------------------------------------------------------------------------------

    async def _drop(self, ws: ServerConnection, acked: int | None = None) -> None:
        await asyncio.sleep(0.05)  # let what was sent reach the client
        if acked is not None:
            self.acked_at_drops.append(acked)
        if self.refuse_after_drop and self._server is not None:
            self._server.close(close_connections=False)
        ws.transport.abort()  # a TCP reset: no close frame

    async def _error(self, ws: ServerConnection, code: str, close: int) -> None:
        await ws.send(json.dumps({"type": "error", "code": code, "message": f"fake {code}"}))
        await ws.close(close, code)

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        try:
            first = json.loads(await ws.recv())
        except ConnectionClosed:
            return
        self.first_messages.append(first)
        if first.get("type") == "start":
            if self.drop_start:
                return await self._drop(ws)
            fmt, start = first.get("format", "fmp4"), 0
            self.format = fmt
        elif first.get("type") == "resume":
            if first.get("token") != TOKEN:
                return await self._error(ws, "invalid_request", 1008)
            if self.expire:
                return await self._error(ws, "expired", 1008)
            if self.busy_resumes > 0:
                self.busy_resumes -= 1
                return await self._error(ws, "server_busy", 1013)
            if self.drop_resumes > 0:
                self.drop_resumes -= 1
                return await self._drop(ws)
            fmt, start = self.format, int(first["from_frame"])
            self.resumed_from.append(start)
        else:
            return await self._error(ws, "invalid_request", 1008)
        await ws.send(json.dumps({"type": "ready", "session_id": SESSION, "width": 16, "height": 16, "fps": 8,
                                  "chunk_frames": self.chunk, "format": fmt,
                                  "mime": "image/jpeg" if fmt == "jpeg" else 'video/mp4; codecs="avc1.64000a"',
                                  "resume_token": TOKEN, "first_frame": start}))  # fmt: skip
        if fmt == "fmp4":
            await ws.send(INIT)
        if self.overlap and first["type"] == "resume":
            s = max(0, start - self.overlap)
            plan = [(f, min(self.chunk, self.total - f)) for f in range(s, self.total, self.chunk)]
        else:
            plan = clips_from(start, self.total, self.chunk)
        acked = start
        stopping = False
        for first_frame, n in plan:
            if stopping:
                break
            index = self._clips_sent
            self._clips_sent += 1
            header = {"type": "clip", "index": index, "first_frame": first_frame, "num_frames": n, "gen_ms": 1.0}
            await ws.send(json.dumps(header))
            if self.drop_at_clips and index == self.drop_at_clips[0]:
                self.drop_at_clips.pop(0)
                if fmt == "jpeg":
                    for i in range(first_frame, first_frame + n // 2):
                        await ws.send(frame(i))
                return await self._drop(ws, acked)
            frames = range(first_frame, first_frame + n)
            media = [segment(first_frame, n)] if fmt == "fmp4" else [frame(i) for i in frames]
            for data in media:
                await ws.send(data)
            while True:  # lock step: the next clip goes out once this one is acknowledged
                try:
                    msg = json.loads(await ws.recv())
                except ConnectionClosed:
                    return
                if msg.get("type") == "stop":
                    stopping = True
                    continue
                if msg != {"type": "ack", "frames": first_frame + n}:
                    self.errors.append(f"expected the ack of {first_frame + n}, got {msg}")
                acked = max(acked, int(msg.get("frames", 0)))
                break
        await ws.send(json.dumps({"type": "done", "frames": acked}))
        await ws.close(1000)
