"""`ca2vdm bench --realtime`: how many viewers the engine keeps at the playback rate without a stall.

1. Ramp: a live viewer (an image-conditioned stream at the model's fps, clips acknowledged as they arrive) joins
   every `join_every_s` until one stalls (a clip out after its viewer needed it) or the engine refuses one for want
   of real-time capacity; the candidate is the count before that.
2. Hold: the candidate count runs for `hold_s`; a stall sends it one lower and the hold starts again.
3. While the held load runs, viewers come and go: `probes` times the oldest viewer leaves and a new one joins in
   its place, so the load stays at the count held; the time to first clip of those joiners is the time to first
   clip of a session joining at that load (p50, p99). Their stalls count too.
The result also gives the share of the compute floor the held load uses (denoising-forward FLOPs of the frames it
generated, at the card's measured matmul rate, over the wall time) and the engine's own capacity estimate.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.model.loader import Pipeline


@dataclass
class Viewer:
    """One live stream as its viewer experiences it."""

    joined: float
    first_clip_s: float | None = None
    frames: int = 0  # generated frames received
    stalls: int = 0  # clips that came after their due time, once the first was out
    stall_s: float = 0.0
    refused: str | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.frames, self.stalls, self.stall_s = 0, 0, 0.0


async def _watch(engine: Engine, params: SessionParams, viewer: Viewer) -> None:
    try:
        handle = await engine.start_session(params)
        async for clip in handle:
            if clip.first_frame == 0 and params.image is not None:
                continue  # the condition image
            if viewer.first_clip_s is None:
                viewer.first_clip_s = time.monotonic() - viewer.joined
            viewer.frames += clip.num_frames
            if clip.ahead_ms is not None and clip.ahead_ms < 0:
                viewer.stalls += 1
                viewer.stall_s += -clip.ahead_ms / 1e3
    except (ServerBusy, SessionFailed) as exc:
        viewer.refused = str(exc)


def _params(pipe: Pipeline, steps: int, seed: int) -> SessionParams:
    h, w = pipe.frame_size
    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return SessionParams(image=image, seed=seed, sampler="ddim", steps=steps, num_frames=None, pace="realtime")


async def _run(engine: Engine, pipe: Pipeline, steps: int, max_sessions: int, join_every_s: float, hold_s: float,
               probes: int) -> dict:  # fmt: skip
    viewers: list[Viewer] = []

    def join(seed: int) -> Viewer:
        v = Viewer(joined=time.monotonic())
        v.task = asyncio.create_task(_watch(engine, _params(pipe, steps, seed), v))
        viewers.append(v)
        return v

    # 1. ramp
    ramp, stop_reason = [], "max_sessions"
    for n in range(1, max_sessions + 1):
        join(n)
        await asyncio.sleep(join_every_s)
        stalled = sum(v.stalls for v in viewers)
        refused = [v for v in viewers if v.refused]
        ramp.append({"sessions": n, "stalls": stalled, "refused": len(refused)})
        if stalled or refused:
            stop_reason = "stall" if stalled else f"refused: {refused[0].refused}"
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
        for i in range(probes):
            await asyncio.sleep(hold_s / (probes + 1))
            leaving = viewers.pop(0)
            leaving.task.cancel()  # type: ignore[union-attr]
            await asyncio.gather(leaving.task, return_exceptions=True)  # type: ignore[arg-type]
            gone_frames = leaving.frames
            joiners.append(join(10_000 * (len(holds) + 1) + i))
            done_frames.append(gone_frames)
        await asyncio.sleep(max(0.0, hold_s - (time.monotonic() - start)))
        wall = time.monotonic() - start
        probe_ttfc = [v.first_clip_s for v in joiners if v.first_clip_s is not None]
        row = {"sessions": k, "hold_s": wall, "stalls": sum(v.stalls for v in viewers),
               "stall_s": sum(v.stall_s for v in viewers), "frames": sum(v.frames for v in viewers) + sum(done_frames),
               "joiners": len(joiners), "joining_first_clip_s": probe_ttfc}  # fmt: skip
        holds.append(row)
        if row["stalls"] == 0 or k == 1 or len(holds) == 3:
            break
        k -= 1
    for v in viewers:
        v.task.cancel()  # type: ignore[union-attr]
    await asyncio.gather(*(v.task for v in viewers), return_exceptions=True)
    return {"ramp": ramp, "ramp_stop": stop_reason, "holds": holds}


def realtime_scenario(pipe: Pipeline, floor_ms: float, steps: int | None = None, max_sessions: int = 32,
                      max_batch: int = 16, join_every_s: float = 1.0, hold_s: float = 60.0,
                      probes: int = 10) -> dict:  # fmt: skip
    """See the module docstring. `floor_ms`: one batch-1 denoising forward's FLOPs at the measured matmul rate."""
    steps = steps or pipe.config.default_steps
    # admission lets every session in (target 1.0, long wait): the ramp, not the estimate, finds the limit
    config = EngineConfig(max_sessions=max_sessions, max_batch=min(max_batch, max_sessions), realtime_target=1.0,
                          admission_wait_s=30.0, max_waiting=max_sessions)  # fmt: skip
    engine = Engine(pipe, config).start()
    try:
        run = asyncio.run(_run(engine, pipe, steps, max_sessions, join_every_s, hold_s, probes))
        estimate = engine.realtime_capacity(steps)
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
        **run,
    }
