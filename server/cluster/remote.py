"""The ingress's side of the engine replicas: `RemoteEngine` offers the API's routes what they use of an `Engine`
(start_session, resume, realtime_capacity, pipe, stats), with the engines being Serve replicas reached through a
DeploymentHandle; `RemoteHandle` is a session's handle, its clips arriving as a streaming call.

A session's clips come back on one streaming call (`EngineReplica.open_stream`); acknowledgements, stop and detach
are small calls routed to the replica named in the session id (`router.Route`). A new session is offered to the
replica with the most real-time capacity to spare; one that is full answers `full` at once and the next is tried.
When every replica is full the session waits here, not in one replica's queue (where it would miss room freed on
another): first come first served within its class (live, background), at most `max_waiting` per replica beyond
the replicas' free slots, a live one for `admission_wait_s` (a background one without a deadline, as on one
server), offered again every `RETRY_S` and whenever a session of this ingress ends; then `server_busy`.
A viewer who joins the moment another leaves thus gets the leaver's room even before the leaving replica has
noticed.

When the replica serving a stream leaves (a drain on scale-down) or dies, the stream ends with `SessionMoved`: the
websocket closes with 1012 and the client resumes with its token, which reaches a replica that takes over the
session from the frames the leaving one saved (or answers `expired` when it died without saving them).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray.exceptions
from ray.serve import context as serve_context
from ray.serve._private.utils import generate_request_id
from ray.serve.exceptions import RequestCancelledError
from torch import Tensor

from ca2vdm.server.engine.handle import ServerBusy, SessionFailed, StreamInfo
from ca2vdm.server.engine.session import Prompt, SessionParams
from ca2vdm.server.engine.stats import EngineStats
from ca2vdm.server.model.loader import PipelineConfig

from .membership import members
from .router import Route

log = logging.getLogger("ca2vdm.cluster")

ENGINE_DEPLOYMENT = "EngineReplica"
RETRY_S = 0.1  # how often the session at the head of the ingress's queue is offered to the replicas again
# what a call to a replica that died (or is being replaced) raises
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RequestCancelledError)


class SessionMoved(SessionFailed):
    """The replica serving this session left (or died): the client resumes it (websocket close 1012)."""

    def __init__(self, message: str) -> None:
        super().__init__("moved", message)


@dataclass(frozen=True)
class ModelSpec:
    """What the ingress needs to know of the model the replicas serve (request validation, /v1/models)."""

    name: str
    config: PipelineConfig
    frame_size: tuple[int, int]  # (height, width)
    device: str
    steps: dict[str, int]  # default steps per sampler

    def default_steps(self, sampler: str) -> int:
        return self.steps[sampler]


@dataclass(frozen=True)
class RemoteClip:
    """A clip as it crosses from a replica to the ingress: its media, and its frames only for `raw` sessions."""

    index: int
    first_frame: int
    num_frames: int
    gen_ms: float
    ahead_ms: float | None
    media: list[bytes] = field(default_factory=list)
    frames: Tensor | None = None

    @property
    def end_frame(self) -> int:
        return self.first_frame + self.num_frames


def remote(method: Any, *args: Any, **kwargs: Any) -> Any:
    """`method.remote(*args, **kwargs)` as a request of its own. Inside a request (a websocket, /metrics) Serve
    gives every call the incoming request's internal id, and its router matches routed requests to callers by that
    id: two calls in flight at once from one request would then be confused (one waits for a replica chosen for the
    other, seconds of backoff). A copy of the context with a new id keeps them apart."""

    def call() -> Any:
        serve_context._set_request_context(_internal_request_id=generate_request_id())
        return method.remote(*args, **kwargs)

    return contextvars.copy_context().run(call)


class RemoteHandle:
    """A session served by a replica; the same use as `SessionHandle` (`async for clip in handle`, ack, cancel,
    detach, end)."""

    def __init__(self, engine: RemoteEngine, stream: Any, first: dict, auto_ack: bool) -> None:
        self._engine, self._stream = engine, stream
        self.info: StreamInfo = first["info"]
        self.replica: str = first["replica"]  # the replica holding the session's pages
        self.requested_frames: int | None = first["num_frames"]
        self._stream_key: str = first["stream"]  # this stream's (not its session's) key on the replica
        self.auto_ack = auto_ack
        self._ended = False

    @property
    def id(self) -> str:
        return self.info.session_id

    def _send(self, method: str, *args: Any, frees: bool = False) -> None:
        self._engine.call_soon(method, self._stream_key, *args, route=Route(replica=self.replica), frees=frees)

    def ack(self, frames: int) -> None:
        self._send("ack", frames)

    def cancel(self) -> None:
        self._send("cancel", frees=True)

    def detach(self) -> None:
        self._send("detach", frees=True)

    def set_prompt(self, prompt: Prompt, recache: bool = False) -> None:
        self._send("set_prompt", prompt, recache)

    def end(self) -> None:
        """Stop reading clips (the consumer left; the replica keeps the session for a resume)."""
        self._ended = True
        self._stream.cancel()

    async def __aiter__(self) -> AsyncIterator[RemoteClip]:
        while True:
            try:
                item = await self._stream.__anext__()
            except StopAsyncIteration:
                self._engine.room_freed()
                return
            except REPLICA_GONE as exc:
                if self._ended:
                    return
                raise SessionMoved(f"the engine replica serving this session stopped ({type(exc).__name__})") from exc
            if "clip" in item:
                clip: RemoteClip = item["clip"]
                if self.auto_ack:
                    self.ack(clip.end_frame)
                yield clip
            elif "moved" in item:
                raise SessionMoved("the engine replica serving this session is leaving: resume it")
            else:
                raise SessionFailed(item["error"], item["message"])


class RemoteEngine:
    def __init__(self, handle: Any, deployment: str = ENGINE_DEPLOYMENT, *, max_waiting: int = 64,
                 admission_wait_s: float = 10.0) -> None:  # fmt: skip
        """`max_waiting` (per replica) and `admission_wait_s`: the engine settings of the same names, applied to
        sessions that find every replica full."""
        self._handle, self.deployment = handle, deployment
        self.max_waiting, self.admission_wait_s = max_waiting, admission_wait_s
        self.stats = EngineStats()  # the ingress's own (resume latencies seen by its clients)
        self.pipe: ModelSpec | None = None
        self._calls: set[asyncio.Task] = set()
        self.num_waiting = 0  # sessions waiting here for a replica with room
        # FIFO per class (live, background), as one engine queues: the waiting session holding its class's lock is
        # the one offered to the replicas; a job waiting for a background slot never holds up a live viewer
        self._queues = {True: asyncio.Lock(), False: asyncio.Lock()}
        self._freed = {True: asyncio.Event(), False: asyncio.Event()}  # a session ended: room may have come free

    async def connect(self, timeout_s: float = 600.0) -> RemoteEngine:
        """Wait for a replica and learn the model from it."""
        info = await asyncio.wait_for(remote(self._handle.describe, route=Route()), timeout_s)
        self.pipe = info["model"]
        return self

    @property
    def alive(self) -> bool:
        """At least one replica is running (as Serve tells this process's router)."""
        return bool(members(self.deployment))

    async def waiting_now(self) -> int:
        """Sessions waiting for admission on the replicas, asked of each now (routing stats are up to a period
        old: a session being admitted would read as waiting). What the realtime bench asks of a cluster."""
        answers = await asyncio.gather(*(self.replica_call(r, "ping", 2.0) for r in members(self.deployment)))
        return self.num_waiting + sum(a["waiting"] for a in answers if a is not None)

    def realtime_capacity(self, steps: int | None = None) -> int:
        return sum(int(stats.get("capacity", 0)) for stats in members(self.deployment).values())

    def call_soon(self, method: str, *args: Any, route: Route, frees: bool = False) -> None:
        """A call whose answer nobody waits for (acks, stop, detach); a failure is logged, not raised. `frees`: once
        done, a waiting session is offered to the replicas again."""

        async def call() -> None:
            try:
                await remote(getattr(self._handle, method), *args, route=route)
            except REPLICA_GONE:
                pass  # the session went with its replica
            except Exception:  # noqa: BLE001
                log.exception("%s on replica %s failed", method, route.replica)
            finally:
                if frees:
                    self.room_freed()

        task = asyncio.get_running_loop().create_task(call())
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _open(self, request: dict, route: Route) -> tuple[Any, dict]:
        stream = remote(self._handle.options(stream=True).open_stream, request, route=route)
        try:
            first = await stream.__anext__()
        except (StopAsyncIteration, *REPLICA_GONE) as exc:
            raise SessionFailed("internal", f"the engine replica did not answer ({type(exc).__name__})") from exc
        return stream, first

    async def encode_prompt(self, text: str) -> Any:
        """A prompt's caption features, from a replica's text encoder (ValueError: refused)."""
        try:
            return await remote(self._handle.encode_prompt, text, route=Route())
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, ValueError):
                raise ValueError(str(cause).splitlines()[-1]) from exc
            raise

    def wait_limit(self) -> int:
        """How many sessions may wait here: `max_waiting` per replica beyond the replicas' free slots (as one
        engine's queue takes `max_waiting` beyond its own: a session with a slot but no real-time capacity yet
        waits), from the routing stats."""
        replicas = members(self.deployment)
        free = sum(int(stats.get("free_slots", 0)) for stats in replicas.values())
        return self.max_waiting * max(1, len(replicas)) + free

    def room_freed(self) -> None:
        for freed in self._freed.values():
            freed.set()

    async def start_session(self, params: SessionParams, *, auto_ack: bool = True, client: str | None = None,
                            resumable: bool = False, owner: str | None = None) -> RemoteHandle:  # fmt: skip
        """Offer the session to the replicas, most spare capacity first, a full one (no real-time capacity to spare
        for a live session, no free slot for a background one) skipped; when all are full, wait here (see the
        module docstring). Raises ServerBusy when it cannot wait, or (a live session) waited `admission_wait_s` in
        vain; a background session waits without a deadline, as on one server."""
        request = {"kind": "start", "params": params, "client": client, "resumable": resumable, "owner": owner,
                   "only_if_room": True}  # fmt: skip
        live = params.pace == "realtime"
        queue, freed = self._queues[live], self._freed[live]
        if not queue.locked() and (handle := await self._offer(request, auto_ack)) is not None:
            return handle  # nobody of its class waits ahead of it and a replica had room
        if self.num_waiting >= self.wait_limit():
            raise ServerBusy("server busy: every engine replica is full and too many sessions are waiting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait_s if live else None
        busy = ServerBusy(f"server busy: no engine replica had room within {self.admission_wait_s:g} s; retry later")
        self.num_waiting += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await queue.acquire()
            except TimeoutError:
                raise busy from None
            try:  # an offer is never cut short (a replica may be taking the session): the deadline is checked between
                while True:
                    freed.clear()
                    if (handle := await self._offer(request, auto_ack)) is not None:
                        return handle
                    left = RETRY_S if deadline is None else deadline - loop.time()
                    if left <= 0:
                        raise busy
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed.wait(), min(RETRY_S, left))
            finally:
                queue.release()
        finally:
            self.num_waiting -= 1

    async def _offer(self, request: dict, auto_ack: bool) -> RemoteHandle | None:
        """One round: each replica in routing order until one takes the session (None: all were full)."""
        avoid: list[str] = []
        for _ in range(max(1, len(members(self.deployment)))):
            try:
                stream, first = await self._open(request, Route(new=True, avoid=tuple(avoid)))
            except SessionFailed as exc:  # a replica died or is being replaced: this round found no room
                log.warning("offering a new session: %s; offered again shortly", exc)
                return None
            if "full" in first:
                avoid.append(first["replica"])
                continue
            if "error" in first:
                if first["error"] == "server_busy":
                    raise ServerBusy(first["message"])
                raise SessionFailed(first["error"], first["message"])
            return RemoteHandle(self, stream, first, auto_ack)
        return None

    async def resume(self, token: str, from_frame: int, *, owner: str | None = None, auto_ack: bool = True,
                     client: str | None = None) -> RemoteHandle:  # fmt: skip
        request = {"kind": "resume", "token": token, "from_frame": from_frame, "owner": owner, "client": client}
        stream, first = await self._open(request, Route(session=token))
        if "moved" in first:  # its replica is leaving and saving it: the client resumes again (1012)
            raise SessionMoved("the engine replica holding this session is leaving: resume it again")
        if "error" in first:
            raise SessionFailed(first["error"], first["message"])
        return RemoteHandle(self, stream, first, auto_ack)

    async def replica_call(self, replica: str, method: str, timeout_s: float) -> Any:
        """`method` of one replica (None if it did not answer in time, or another answered)."""
        try:
            answer = await asyncio.wait_for(
                remote(getattr(self._handle, method), route=Route(replica=replica)), timeout_s
            )
        except (TimeoutError, *REPLICA_GONE):
            return None
        return answer if isinstance(answer, dict) and answer.get("replica") == replica else None
