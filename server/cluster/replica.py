"""`EngineReplica`: one engine (one GPU, its own page pool) as a Ray Serve replica.

The ingress reaches it through a DeploymentHandle routed by `router.SessionRouter`: `open_stream` starts or resumes
a session and streams its clips back; `ack`, `cancel` and `detach` act on a session it holds; `describe` and
`metrics` answer for the replica. Serve polls `record_routing_stats` (spare real-time capacity, free pages: what
the router ranks replicas by) and `record_autoscaling_stats` (live sessions and real-time capacity: what
`autoscale.policy` scales on).

Leaving (scale-down): Serve stops routing to a replica before it stops it, and the replica notices (it is no longer
among its deployment's members). With a shared session directory it then hands its sessions over: the engine stops
and saves every resumable session there, and each open stream ends with `moved`, so that the client resumes and the
resume reaches another replica, which takes the session's file (`Engine.resume`). Its REST jobs go back to the queue
for another replica. Without a shared directory its streams run on until Serve's graceful-shutdown timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from ca2vdm.server.api.metrics import metrics_text
from ca2vdm.server.api.settings import Settings
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed, SessionHandle
from ca2vdm.server.engine.session import Prompt, SessionParams, rows_of
from ca2vdm.server.model.diffusion import SAMPLERS
from ca2vdm.server.model.loader import load_pipeline

from .membership import known, members, was_member
from .remote import ModelSpec, RemoteClip, remote
from .router import Route, replica_of

log = logging.getLogger("ca2vdm.cluster")

DRAIN_CHECK_S = 1.0  # how often a replica looks whether it is still a member of its deployment
HANDOVER_WAIT_S = 30.0  # a resume of a leaving replica's session waits this long for its saved file


class EngineReplica:
    def __init__(self, settings: dict[str, Any], session_dir: str | None = None, torch_threads: int | None = None,
                 jobs: dict[str, Any] | None = None) -> None:  # fmt: skip
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.settings = Settings(**settings)
        context = serve.get_replica_context()
        self.id, self.deployment, self.app = context.replica_id.unique_id, context.deployment, context.app_name
        s = self.settings
        pipe = load_pipeline(s.model, preset=s.preset, vae=s.vae, device=s.device, precision=s.precision,
                             text_encoder=s.text_encoder, text_device=s.text_encoder_device,
                             text_cache_size=s.prompt_cache_size)  # fmt: skip
        config = replace(s.engine_config(), id_prefix=self.id, resume_dir=session_dir, shared_resume_dir=True)
        if session_dir:
            _prune(Path(session_dir), s.resume_keep_s)
        self.engine = Engine(pipe, config).start()
        # open streams, by "<session id>#<n>": a resumed session's new stream gets a new key, so a call of its dropped
        # connection (a late detach or ack) cannot reach it
        self.handles: dict[str, SessionHandle] = {}
        self._stream_numbers = itertools.count(1)
        self.draining = False
        self._stopped = False
        self._tasks: list[asyncio.Task] = []
        self._jobs_config = jobs
        self.job_worker: Any = None
        log.info("replica %s: model %s on %s, real-time capacity %d sessions", self.id, pipe.name, pipe.device,
                 self.engine.realtime_capacity())  # fmt: skip

    # ---- calls from the ingress ----------------------------------------------------------------------

    async def describe(self, route: Route | None = None) -> dict:
        await self._start_background()
        pipe = self.engine.pipe
        spec = ModelSpec(pipe.name, pipe.config, pipe.frame_size, str(pipe.device),
                         {name: pipe.default_steps(name) for name in SAMPLERS})  # fmt: skip
        return {"replica": self.id, "model": spec, "realtime_capacity": self.engine.realtime_capacity()}

    async def open_stream(self, request: dict, route: Route | None = None):
        """Start (`kind` "start") or resume (`kind` "resume") a session; yields its `info` first (or `full`, or an
        `error`), then each clip, then `moved` if this replica handed the session over while streaming."""
        await self._start_background()
        if self.draining:
            yield {"full": True, "replica": self.id} if request["kind"] == "start" else {"moved": True}
            return
        try:
            handle = await self._open(request)
        except _Full:
            yield {"full": True, "replica": self.id}
            return
        except ServerBusy as exc:
            yield {"error": "server_busy", "message": str(exc)}
            return
        except (SessionFailed, ValueError) as exc:
            yield self._refusal(request, exc)
            return
        key = f"{handle.id}#{next(self._stream_numbers)}"
        self.handles[key] = handle
        raw = handle.info.format == "raw"
        try:
            yield {"info": handle.info, "replica": self.id, "num_frames": handle.session.params.num_frames,
                   "stream": key}  # fmt: skip
            async for clip in handle:
                yield {"clip": RemoteClip(clip.index, clip.first_frame, clip.num_frames, clip.gen_ms, clip.ahead_ms,
                                          clip.media, clip.frames if raw else None)}  # fmt: skip
            if self.draining and not handle.session.state.is_finished:
                yield {"moved": True}
        except SessionFailed as exc:
            yield {"error": exc.code, "message": str(exc)}
        except (asyncio.CancelledError, GeneratorExit):  # the ingress stopped reading: its client left
            handle.detach()
            raise
        finally:
            self.handles.pop(key, None)

    def _refusal(self, request: dict, exc: Exception) -> dict:
        code = getattr(exc, "code", "invalid_request")
        home = replica_of(request.get("token", ""))
        if (
            request["kind"] == "resume"
            and code == "invalid_request"
            and home != self.id
            and was_member(self.deployment, home)
        ):
            # a session of a replica that is gone (the router sent it here) and left nothing saved: it died
            return {"error": "expired", "message": "the engine replica that held this session stopped without handing "
                    "it over: start a new session"}  # fmt: skip
        return {"error": code, "message": str(exc)}

    async def _open(self, request: dict) -> SessionHandle:
        owner, client = request.get("owner"), request.get("client")
        if request["kind"] == "resume":
            return await self._resume(request["token"], request["from_frame"], owner, client)
        params: SessionParams = request["params"]
        if request.get("only_if_room") and not self.has_room(params):
            raise _Full
        return await self.engine.start_session(params, auto_ack=False, client=client,
                                               resumable=request.get("resumable", False), owner=owner)  # fmt: skip

    async def _resume(self, token: str, from_frame: int, owner: str | None, client: str | None) -> SessionHandle:
        """Resume a session: one of this replica's, or one a leaving replica saved to the shared directory. A client
        can get here before the leaving replica has saved its session (Serve stops routing to a replica, and may
        end its streams, before the replica notices that it is leaving): while that replica's process is still
        alive, wait for its file (at most HANDOVER_WAIT_S); a replica that died saves nothing, so no wait then."""
        deadline = time.monotonic() + HANDOVER_WAIT_S
        home, alive_checked = replica_of(token), -float("inf")
        while True:
            try:
                return await self.engine.resume(token, from_frame, owner=owner, auto_ack=False, client=client)
            except SessionFailed as exc:
                unknown = exc.code == "invalid_request" and str(exc) == "unknown resume token"  # not here (yet)
                if not unknown or home in ("", self.id) or time.monotonic() > deadline:
                    raise
                if time.monotonic() - alive_checked >= 1.0:  # asking Ray about the actors costs: once a second
                    if not await asyncio.to_thread(replica_alive, self.app, self.deployment, home):
                        raise
                    alive_checked = time.monotonic()
            await asyncio.sleep(0.25)

    async def ack(self, stream: str, frames: int, route: Route | None = None) -> None:
        """Calls about one open stream (`stream`: its key, from its first answer)."""
        if (handle := self.handles.get(stream)) is not None:
            handle.ack(frames)

    async def cancel(self, stream: str, route: Route | None = None) -> None:
        if (handle := self.handles.get(stream)) is not None:
            handle.cancel()

    async def set_prompt(self, stream: str, prompt: Prompt, recache: bool, route: Route | None = None) -> None:
        if (handle := self.handles.get(stream)) is not None:
            handle.set_prompt(prompt, recache)

    async def encode_prompt(self, text: str, route: Route | None = None) -> Any:
        """A prompt's caption features (CPU tensors), for the ingress (ValueError: refused, or no text encoder)."""
        encoder = self.engine.pipe.text
        if encoder is None:
            raise ValueError(f"model {self.engine.pipe.name} has no text encoder")
        return await asyncio.to_thread(encoder.encode, text)

    async def detach(self, stream: str, route: Route | None = None) -> None:
        if (handle := self.handles.get(stream)) is not None:
            handle.detach()

    async def metrics(self, route: Route | None = None) -> dict:
        return {"replica": self.id, "text": metrics_text(self.engine, None)}

    async def ping(self, route: Route | None = None) -> dict:
        return {"replica": self.id, "waiting": self.engine.num_waiting, "pid": os.getpid()}

    # ---- what Serve asks -------------------------------------------------------------------------------

    def spare_sessions(self, steps: int | None = None) -> int:
        """Live sessions this replica could still take and keep in real time (and within its page pool)."""
        return min(self.engine.realtime_capacity(steps) - self._live_sessions(), self._free_slots())

    def _live_sessions(self) -> int:
        """Live sessions holding (or waiting for) a share of real-time capacity: not paused, not detached."""
        s = self.engine.scheduler
        return len(s.live_steps()) + rows_of(list(s.waiting_live))  # rows: a guided session is two

    def _free_slots(self) -> int:
        """Cache streams (rows) no admitted or waiting session holds: what `max_sessions` bounds."""
        s = self.engine.scheduler
        return self.engine.config.max_sessions - s.rows_held - s.rows_waiting

    def has_room(self, params: SessionParams) -> bool:
        """Would the session start now: a live one within real-time capacity, a background one in a free slot (a
        guided session needs two of each)."""
        if params.pace == "realtime":
            return self.spare_sessions(params.steps) >= params.rows
        e = self.engine
        background = sum(not s.is_live for s in list(e.scheduler.active)) + len(e.scheduler.waiting_background)
        return self._free_slots() >= params.rows and background < e.config.max_background_sessions

    async def record_routing_stats(self) -> dict:
        await self._start_background()
        leaving = self.draining
        return {"spare": 0 if leaving else self.spare_sessions(), "capacity": self.engine.realtime_capacity(),
                "free_pages": self.engine.runner.num_free_pages, "free_slots": 0 if leaving else self._free_slots(),
                "draining": leaving}  # fmt: skip

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {
            "live_sessions": float(self._live_sessions()),
            "realtime_capacity": float(self.engine.realtime_capacity()),
        }

    async def check_health(self) -> None:
        if not self._stopped and not self.engine.alive:
            raise RuntimeError("the engine thread died")

    async def __del__(self) -> None:
        await self._stop()

    # ---- background: REST jobs, leaving -----------------------------------------------------------------

    async def _start_background(self) -> None:
        if self._tasks or self._stopped:
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_membership()))
        if self._jobs_config is not None:
            from .jobs import start_worker  # psycopg and boto3 only where jobs are shared

            self.job_worker = await start_worker(self._jobs_config, self.engine, self.id)

    async def _watch_membership(self) -> None:
        """Drain once Serve has taken this replica out of its deployment (it is being stopped)."""
        handle = serve.get_deployment_handle(self.deployment, app_name=self.app)
        seen, missing = False, 0
        while not self._stopped:
            try:
                await remote(handle.ping, route=Route(replica=self.id))  # keeps this process's router informed
            except Exception:  # noqa: BLE001 - membership is still read below
                pass
            if self.id in members(self.deployment):
                seen, missing = True, 0
            elif seen and known(self.deployment):
                missing += 1
                if missing >= 2:
                    await self._drain()
                    return
            await asyncio.sleep(DRAIN_CHECK_S)

    async def _drain(self) -> None:
        log.info("replica %s is leaving: %d streams hand over", self.id, len(self.handles))
        self.draining = True
        if self.engine.config.resume_dir:
            await self._stop()
            for handle in list(self.handles.values()):
                handle.end()  # its stream ends with `moved`: the client resumes on another replica

    async def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.job_worker is not None:
            await self.job_worker.stop()  # its unfinished jobs go back to the queue, for another replica
            self.job_worker.store.close()
        await asyncio.to_thread(self.engine.stop)  # saves resumable sessions in the shared directory


def replica_alive(app: str, deployment: str, replica: str) -> bool:
    """Whether the process of `replica` (of `deployment` in `app`) is still running, as Ray's named actors say
    (Serve names each replica's actor after the app, deployment and replica id)."""
    suffix = f"{app}#{deployment}#{replica}"
    return any(a["name"].endswith(suffix) for a in ray.util.list_named_actors(all_namespaces=True))


class _Full(Exception):
    """This replica has no real-time capacity to spare (the ingress tries the next one)."""


def _prune(directory: Path, keep_s: float) -> None:
    """Saved sessions nobody resumed within `keep_s` (their replicas are long gone) are deleted."""
    if not directory.is_dir():
        return
    now = time.time()
    for path in directory.iterdir():
        try:
            if now - path.stat().st_mtime > keep_s:
                path.unlink()
        except OSError:
            pass
