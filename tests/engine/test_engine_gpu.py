"""The engine's GPU-only paths: CUDA graphs of the denoising forward and of the cache write, and steps that
never synchronise with the GPU. Skipped without CUDA (CI); run on a GPU machine with `pytest tests/engine`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.engine.runner import ModelRunner
from ca2vdm.server.engine.session import Session, SessionParams
from ca2vdm.server.model.generate import generate_video
from ca2vdm.server.model.loader import load_pipeline
from tests.images import smooth_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and stream syncs need a GPU")
SAMPLERS = [("ddim", 4), ("iddpm", 5), ("ddim", 3)]


@pytest.fixture(scope="module")
def gpu_pipe():
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, so graphs and eager agree to rounding
    return load_pipeline("random:tiny", device="cuda", dtype=torch.float32)


def test_graphed_sessions_equal_the_offline_loop(gpu_pipe):
    """Batched sessions through the graphed forward and graphed cache writes (19 frames: the condition frame,
    two full chunks and a partial one) against each session alone through the eager offline loop."""
    params = [SessionParams(image=smooth_image(16, 16, i), seed=i, sampler=s, steps=n, num_frames=19)
              for i, (s, n) in enumerate(SAMPLERS)]  # fmt: skip

    async def main(engine):
        async def one(p):
            return torch.cat([clip.frames async for clip in await engine.start_session(p)])

        return await asyncio.gather(*(one(p) for p in params))

    engine = Engine(gpu_pipe, EngineConfig(max_sessions=3, max_batch=3)).start()
    try:
        assert engine.runner.writer is not None, "write graphs expected on CUDA"
        results = asyncio.run(main(engine))
    finally:
        engine.stop()
    for p, frames in zip(params, results, strict=True):
        solo = generate_video(gpu_pipe, gpu_pipe.sampler(p.sampler, p.steps), image=p.image, num_frames=19,
                              seed=p.seed)  # fmt: skip
        assert frames.shape == solo.shape
        assert (frames.int() - solo.int()).abs().max() <= 1


def test_a_denoising_step_never_waits_for_the_gpu(gpu_pipe):
    """Page tables and timesteps travel asynchronously and row selections need no index on the GPU: the host
    prepares step n+1 while the GPU runs step n. Two samplers in one batch, one of them on rows 0 and 2."""
    runner = ModelRunner(gpu_pipe, EngineConfig(max_sessions=3, max_batch=3))
    runner.capture_graphs()
    sessions = [Session(SessionParams(image=None, seed=i, sampler=s, steps=n)) for i, (s, n) in enumerate(SAMPLERS)]
    runner.prefill(sessions)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            runner.denoise(sessions)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [runner.states[s.id].step for s in sessions] == [n - 4 for _, n in SAMPLERS]
