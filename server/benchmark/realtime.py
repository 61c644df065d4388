"""`ca2vdm bench --realtime`: how many viewers the engine keeps at the playback rate without a stall.

1. Ramp: a live viewer (an image-conditioned stream at the model's fps, clips acknowledged as they arrive) joins
   every `join_every_s` until one stalls, as its viewer sees it (a player that ran dry, or a joiner without its first
   clip after FIRST_CLIP_LIMIT_S), or the engine does not admit one within the interval for want of real-time
   capacity; the candidate is the count before that.
2. Hold: the candidate count runs for `hold_s`; a stall sends it one lower and the hold starts again.
3. While the held load runs, viewers come and go: `probes` times the oldest viewer leaves and a new one joins in
   its place, so the load stays at the count held; the time to first clip of those joiners is the time to first
   clip of a session joining at that load (p50, p99). Their stalls count too.
4. With `job_frames`, a REST job of that many frames (pace "max") is then submitted at the held load: the time it
   takes on the capacity the viewers leave, and the viewers' stalls meanwhile.
The result also gives the share of the compute floor the held load uses (denoising-forward FLOPs of the frames it
generated, at the card's measured matmul rate, over the wall time) and the engine's own capacity estimate.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.model.loader import Pipeline

FIRST_CLIP_LIMIT_S = 5.0  # a joiner without its first clip by then counts as stalled
JOB_LIMIT_S = 300.0  # a job at the held load that has not finished by then is reported unfinished


@dataclass
class Viewer:
    """One live stream as its viewer experiences it: a player that starts with the first generated clip, plays at
    the model's fps, and when its buffer runs dry waits (a stall) and resumes where it was."""

    joined: float
    fps: int = 8
    first_clip_s: float | None = None
    clock_start: float | None = None  # when the player started, moved on by each stall
    buffered: int = 0  # generated frames received
    frames: int = 0  # generated frames received since the last reset
    stalls: int = 0
    stall_s: float = 0.0
    refused: str | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    def arrive(self, now: float, num_frames: int) -> None:
        if self.clock_start is None:
            self.first_clip_s, self.clock_start = now - self.joined, now
        else:
            dry = now - self.clock_start - self.buffered / self.fps  # > 0: the player waited this long
            if dry > 0:
                self.stalls += 1
                self.stall_s += dry
                self.clock_start += dry
        self.buffered += num_frames
        self.frames += num_frames

    def starving(self, now: float) -> bool:
        """Waiting right now: no first clip after FIRST_CLIP_LIMIT_S, or the buffer has run dry."""
        if self.clock_start is None:
            return now - self.joined > FIRST_CLIP_LIMIT_S
        return now - self.clock_start > self.buffered / self.fps

    def reset(self) -> None:
        self.frames, self.stalls, self.stall_s = 0, 0, 0.0


async def _watch(engine: Engine, params: SessionParams, viewer: Viewer) -> None:
    handle = None
    try:
        handle = await engine.start_session(params)
        async for clip in handle:
            if clip.first_frame == 0 and params.image is not None:
                continue  # the condition image
            viewer.arrive(time.monotonic(), clip.num_frames)
    except (ServerBusy, SessionFailed) as exc:
        viewer.refused = str(exc)
    finally:
        if handle is not None:  # a viewer who leaves ends its session at once (as a closed websocket does)
            handle.cancel()


async def _observe(viewers: list[Viewer], seconds: float) -> int:
    """Watch the viewers for `seconds`; how many were starving at some check (stalls not yet ended count too)."""
    starving: set[int] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        starving |= {id(v) for v in viewers if v.starving(now)}
    return len(starving)


def _params(pipe: Pipeline, steps: int, seed: int) -> SessionParams:
    h, w = pipe.frame_size
    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return SessionParams(image=image, seed=seed, sampler="ddim", steps=steps, num_frames=None, pace="realtime")


async def ramp_and_hold(engine: Engine, pipe: Pipeline, steps: int, max_sessions: int, join_every_s: float,
                        hold_s: float, probes: int, job_frames: int = 0) -> dict:  # fmt: skip
    """Steps 1-3 of the module docstring on `engine` (anything with Engine's start_session and num_waiting: a
    cluster's RemoteEngine too)."""
    viewers: list[Viewer] = []

    def join(seed: int) -> Viewer:
        v = Viewer(joined=time.monotonic(), fps=pipe.config.fps)
        v.task = asyncio.create_task(_watch(engine, _params(pipe, steps, seed), v))
        viewers.append(v)
        return v

    # 1. ramp
    ramp, stop_reason = [], "max_sessions"
    for n in range(1, max_sessions + 1):
        join(n)
        starving = await _observe(viewers, join_every_s)
        stalled = sum(v.stalls for v in viewers) + starving
        refused = [v for v in viewers if v.refused]
        # a joiner not admitted within the interval: no real-time capacity left (a cluster's engines are asked now)
        waiting = await engine.waiting_now() if hasattr(engine, "waiting_now") else engine.num_waiting
        ramp.append({"sessions": n, "stalls": stalled, "refused": len(refused), "waiting": waiting})
        if stalled or refused or waiting:
            stop_reason = "stall" if stalled else "not admitted" if waiting else f"refused: {refused[0].refused}"
            break
    k = max(1, len(viewers) - 1) if stop_reason != "max_sessions" else len(viewers)

    # 2. hold (and 3. probes)
    holds = []
    while True:
        for v in viewers[k:]:
            v.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(v.task for v in viewers[k:]), return_exceptions=True)
        del viewers[k:]
        for v in viewers:
            v.reset()
        done_frames: list[int] = []  # frames of viewers that left during the hold
        start = time.monotonic()
        joiners: list[Viewer] = []
        starving = 0
        for i in range(probes):
            starving += await _observe(viewers, hold_s / (probes + 1))
            leaving = viewers.pop(0)
            leaving.task.cancel()  # type: ignore[union-attr]
            await asyncio.gather(leaving.task, return_exceptions=True)  # type: ignore[arg-type]
            gone_frames = leaving.frames
            joiners.append(join(10_000 * (len(holds) + 1) + i))
            done_frames.append(gone_frames)
        starving += await _observe(viewers, max(0.0, hold_s - (time.monotonic() - start)))
        starving += sum(v.first_clip_s is None for v in viewers)  # never started
        wall = time.monotonic() - start
        probe_ttfc = [v.first_clip_s for v in joiners if v.first_clip_s is not None]
        row = {"sessions": k, "hold_s": wall, "stalls": sum(v.stalls for v in viewers) + starving,
               "stall_s": sum(v.stall_s for v in viewers), "frames": sum(v.frames for v in viewers) + sum(done_frames),
               "joiners": len(joiners), "joining_first_clip_s": probe_ttfc}  # fmt: skip
        holds.append(row)
        if row["stalls"] == 0 or k == 1 or len(holds) == 4:
            break
        k -= 1
    job = None
    if job_frames and holds[-1]["stalls"] == 0:
        job = await _job_at_load(engine, pipe, steps, viewers, job_frames)
    for v in viewers:
        v.task.cancel()  # type: ignore[union-attr]
    await asyncio.gather(*(v.task for v in viewers), return_exceptions=True)
    return {"ramp": ramp, "ramp_stop": stop_reason, "holds": holds, "job": job}


async def _job_at_load(engine: Engine, pipe: Pipeline, steps: int, viewers: list[Viewer], frames: int) -> dict:
    """4. A REST job (pace "max", `frames` frames) submitted at the held load: how long it takes on the spare
    capacity, and the viewers' stalls while it runs (it must cause none)."""
    for v in viewers:
        v.reset()
    params = replace(_params(pipe, steps, seed=777), num_frames=frames, pace="max")
    got = 0

    async def run() -> None:
        nonlocal got
        handle = await engine.start_session(params)
        async for clip in handle:
            got += clip.num_frames  # the condition image's frame included, as num_frames counts it

    start = time.monotonic()
    task = asyncio.create_task(run())
    starving: set[int] = set()
    while not task.done() and time.monotonic() - start < JOB_LIMIT_S:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        starving |= {id(v) for v in viewers if v.starving(now)}
    finished = task.done() and task.exception() is None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    wall = time.monotonic() - start
    return {
        "sessions": len(viewers),
        "frames": frames,
        "frames_done": got,
        "finished": finished,
        "wall_s": wall,
        "stalls": sum(v.stalls for v in viewers) + len(starving),
        "stall_s": sum(v.stall_s for v in viewers),
    }


def realtime_scenario(pipe: Pipeline, floor_ms: float, steps: int | None = None, max_sessions: int = 32,
                      max_batch: int = 16, join_every_s: float = 1.0, hold_s: float = 60.0,
                      probes: int = 10, job_frames: int = 0, compile_decoder: bool = True) -> dict:  # fmt: skip
    """See the module docstring. `floor_ms`: one batch-1 denoising forward's FLOPs at the measured matmul rate."""
    steps = steps or pipe.config.default_steps
    # admission lets every session in (target 1.0, long wait): the ramp, not the estimate, finds the limit
    # (and a slot beyond the ramp's for the job)
    slots = max_sessions + (1 if job_frames else 0)
    config = EngineConfig(max_sessions=slots, max_batch=min(max_batch, max_sessions), realtime_target=1.0,
                          admission_wait_s=30.0, max_waiting=max_sessions, compile_decoder=compile_decoder)  # fmt: skip
    engine = Engine(pipe, config).start()
    try:
        run = asyncio.run(ramp_and_hold(engine, pipe, steps, max_sessions, join_every_s, hold_s, probes, job_frames))
        estimate = engine.realtime_capacity(steps)
        measured = engine.capacity.snapshot()
    finally:
        engine.stop()
    held = run["holds"][-1]
    rows = held["frames"] / pipe.config.chunk_frames * steps  # denoising forward rows the held load ran
    ttfc = held["joining_first_clip_s"]
    return {
        "steps": steps,
        "fps": pipe.config.fps,
        "sessions_held": held["sessions"] if held["stalls"] == 0 else 0,
        "held_for_s": held["hold_s"],
        "stalls_in_hold": held["stalls"],
        "joining_first_clip_p50_s": statistics.median(ttfc) if ttfc else None,
        "joining_first_clip_p99_s": float(np.percentile(ttfc, 99)) if ttfc else None,
        "fraction_of_compute_floor": rows * floor_ms / 1e3 / held["hold_s"],
        "engine_estimate_sessions": estimate,
        "engine_measured_s": measured,  # what the estimate rests on: phase -> batch size -> seconds
        **run,
    }
