"""Text-conditioned sessions in the engine (tiny-text model on CPU): prompts and classifier-free guidance batched
with unguided and prompt-less sessions, each equal to its offline generation; a guided session holds two cache
streams; a prompt switch mid-stream, keeping the cached K/V or rewriting them, equals the offline loop doing the
same; a saved session keeps its current prompt."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, SessionFailed
from ca2vdm.server.engine.session import SessionParams
from ca2vdm.server.model.generate import Conditioner, generate_video, perturb_for_cache
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.model.prompt import Prompt


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("random:tiny-text", device="cpu")


def prompt(pipe, seed: int, tokens: int, scale: float = 1.0, text: str | None = None) -> Prompt:
    """Random caption features (a stand-in for the text encoder's output) with `tokens` valid tokens."""
    mc = pipe.config.model
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(mc.model_max_length, mc.caption_channels, generator=g)
    mask = (torch.arange(mc.model_max_length) < tokens).long()
    return Prompt(text or f"prompt {seed}", y, mask, scale)


def config(**kwargs) -> EngineConfig:
    """Sessions here run at pace max (background): these tests are not about real-time admission, which a busy
    machine's measured step times could refuse."""
    return EngineConfig(max_lead_s=3600.0, **{"max_background_sessions": 8, **kwargs})


async def collect(handle):
    return [clip async for clip in handle]


def frames_of(clips) -> torch.Tensor:
    return torch.cat([c.frames for c in clips])


def test_prompted_guided_and_unprompted_sessions_batch_together_each_as_offline(pipe):
    cases = [None, prompt(pipe, 1, 5), prompt(pipe, 2, 8, scale=4.0), prompt(pipe, 3, 3, scale=2.0)]

    async def main():
        engine = Engine(pipe, config(max_sessions=8, max_batch=3)).start()
        try:
            handles = [await engine.start_session(SessionParams(pace="max", seed=10 + i, sampler="ddim", steps=3,
                                                                num_frames=17, prompt=p))  # fmt: skip
                       for i, p in enumerate(cases)]  # fmt: skip
            results = await asyncio.gather(*(collect(h) for h in handles))
            return results, engine.stats, engine.runner.num_free_pages, engine.runner.num_pages
        finally:
            engine.stop()

    results, stats, free, total = asyncio.run(main())
    assert free == total and stats.sessions_total["completed"] == 4
    videos = []
    for i, (p, clips) in enumerate(zip(cases, results, strict=True)):
        offline = generate_video(pipe, pipe.sampler("ddim", 3), image=None, num_frames=17, seed=10 + i, prompt=p)
        assert (frames_of(clips).int() - offline.int()).abs().max() <= 1, f"session {i}"
        videos.append(offline)
    # the conditions matter: another prompt, or the same one guided, gives another video
    assert (videos[0].int() - videos[1].int()).abs().max() > 8
    unguided = generate_video(pipe, pipe.sampler("ddim", 3), image=None, num_frames=17, seed=12,
                              prompt=prompt(pipe, 2, 8))  # fmt: skip
    assert (unguided.int() - videos[2].int()).abs().max() > 8


def test_a_guided_session_needs_two_slots(pipe):
    """max_sessions counts cache streams: one guided session fills a 2-stream engine, a second waits."""

    async def main():
        engine = Engine(pipe, config(max_sessions=2, max_batch=2, max_waiting=4)).start()
        try:
            first = await engine.start_session(SessionParams(pace="max", seed=1, steps=2, num_frames=9,
                                                             prompt=prompt(pipe, 1, 4, scale=3.0)))  # fmt: skip
            second = await engine.start_session(
                SessionParams(pace="max", seed=2, steps=2, num_frames=9, prompt=prompt(pipe, 2, 4))
            )
            await asyncio.sleep(0.2)
            waiting = engine.num_waiting
            await asyncio.gather(collect(first), collect(second))
            return waiting
        finally:
            engine.stop()

    assert asyncio.run(main()) == 1


def _offline_with_switch(pipe, seed: int, first: Prompt, second: Prompt, switch_chunk: int, recache: bool,
                         num_frames: int) -> torch.Tensor:  # fmt: skip
    """The offline loop with the prompt switched before chunk `switch_chunk`: the cached frames keep their K/V, or
    (recache) the cache is written again from the kept latents under the new prompt (before any dequeue)."""
    cfg, model = pipe.config, pipe.model
    sampler = pipe.sampler("ddim", 3)
    gen = torch.Generator().manual_seed(seed)
    text = Conditioner(model, first)
    cache = text.cache(cfg.max_cache_frames)
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    written = [perturb_for_cache(model.bov_token[None, :, None].float(), sampler, cfg.prefix_perturb_t, gen)]
    text.write(cache, written[0])
    frames, k = [], 0
    while sum(f.shape[2] for f in frames) < num_frames:
        if k == switch_chunk:
            text.set_prompt(second)
            if recache:
                history = torch.cat(written, dim=2)
                assert history.shape[2] <= cfg.max_cache_frames
                cache = text.cache(cfg.max_cache_frames)
                text.write(cache, history)
        noise = torch.randn((1, c, cfg.chunk_frames, h, w), generator=gen)
        chunk = sampler.sample_loop(lambda x, t, cache=cache: text.denoise(cache, x, t), noise, generator=gen)
        frames.append(chunk)
        if sum(f.shape[2] for f in frames) < num_frames:
            written.append(perturb_for_cache(chunk, sampler, cfg.prefix_perturb_t, gen))
            text.write(cache, written[-1])
        k += 1
    from ca2vdm.server.model.codecs import frames_to_uint8

    return frames_to_uint8(pipe.codec.decode(torch.cat(frames, dim=2)))[0]


@pytest.mark.parametrize("recache", [False, True])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_a_prompt_switch_applies_from_the_next_clip(pipe, recache, scale):
    first, second = prompt(pipe, 1, 6, scale), prompt(pipe, 7, 3, scale)

    async def main():
        engine = Engine(pipe, config(max_sessions=4, max_batch=4)).start()
        try:
            handle = await engine.start_session(SessionParams(pace="max", seed=5, sampler="ddim", steps=3,
                                                              num_frames=32, prompt=first), auto_ack=False)  # fmt: skip
            clips = []
            async for clip in handle:
                clips.append(clip)
                handle.ack(clip.end_frame)
                if clip.index == 1:  # the switch lands while chunk 2 is in flight: it applies from chunk 3
                    await asyncio.sleep(0)
                    handle.set_prompt(second, recache=recache)
            return clips, engine.stats.prompt_switches
        finally:
            engine.stop()

    clips, switches = asyncio.run(main())
    assert switches["recache" if recache else "keep"] == 1
    frames = frames_of(clips)
    # the switch reaches the engine while it denoises chunk 2 (index 2) or later: find where it applied
    candidates = {k: _offline_with_switch(pipe, 5, first, second, k, recache, 32) for k in (2, 3)}
    matches = [k for k, v in candidates.items() if (frames.int() - v.int()).abs().max() <= 1]
    assert matches, "the switched video equals no offline switch"
    never = _offline_with_switch(pipe, 5, first, second, 99, recache, 32)
    assert (frames.int() - never.int()).abs().max() > 8  # and the switch changed the video


def test_a_switch_keeps_the_guidance_and_a_prompt_for_a_video_model_is_refused(pipe):
    async def main():
        engine = Engine(pipe, config(max_sessions=4, max_batch=4, max_pending_clips=1)).start()
        try:
            handle = await engine.start_session(SessionParams(pace="max", seed=5, steps=2, prompt=prompt(pipe, 1, 4)),
                                                auto_ack=False)  # fmt: skip
            await handle.__aiter__().__anext__()  # then it pauses: nothing applies the switch
            handle.set_prompt(prompt(pipe, 2, 4, scale=2.0))  # unguided stays unguided
            for _ in range(1000):
                if handle.id in engine.runner.pending_prompts:
                    break
                await asyncio.sleep(0.005)
            pending = engine.runner.pending_prompts[handle.id]
            handle.cancel()
            return pending
        finally:
            engine.stop()

    pending = asyncio.run(main())
    assert pending[0].guidance_scale == 1.0 and pending[0].text == "prompt 2"
    video = load_pipeline("random:tiny", device="cpu")
    engine = Engine(video, config(max_sessions=2, max_batch=2))
    with pytest.raises(ValueError, match="takes no text"):
        engine.set_prompt(None, prompt(pipe, 1, 4))  # type: ignore[arg-type]


def test_a_guided_session_with_a_pending_prompt_switch_survives_an_engine_restart(pipe, tmp_path):
    """A switch asked for after clip 0 (the session paused, unacknowledged), then the engine stops: saved with its
    prompt and the switch still to apply, read back by a new engine, its cache rebuilt (both rows) under the prompt
    in use, the switch applied after the chunk in flight, as in the uninterrupted session."""
    first, second = prompt(pipe, 1, 6, 3.0), prompt(pipe, 7, 3, 3.0)
    p = SessionParams(pace="max", seed=5, sampler="ddim", steps=3, num_frames=25, prompt=first)
    cfg = config(max_sessions=4, max_batch=4, resume_dir=str(tmp_path), max_pending_clips=1)

    async def switch_after_clip0(engine, handle):
        it = handle.__aiter__()
        clip = await it.__anext__()  # the session then pauses: clip 0 is not acknowledged
        handle.set_prompt(second, recache=True)
        for _ in range(1000):
            if handle.id in engine.runner.pending_prompts:
                break
            await asyncio.sleep(0.005)
        return clip, it

    async def uninterrupted():
        engine = Engine(pipe, config(max_sessions=4, max_batch=4, max_pending_clips=1)).start()
        try:
            handle = await engine.start_session(p, auto_ack=False)
            clip, it = await switch_after_clip0(engine, handle)
            clips = [clip]
            handle.ack(clip.end_frame)
            async for clip in it:
                clips.append(clip)
                handle.ack(clip.end_frame)
            return frames_of(clips)
        finally:
            engine.stop()

    async def before_restart():
        engine = Engine(pipe, cfg).start()
        try:
            handle = await engine.start_session(p, auto_ack=False, resumable=True)
            clip, _ = await switch_after_clip0(engine, handle)
            return handle.info.resume_token, clip
        finally:
            engine.stop()

    async def after_restart(token, got):
        engine = Engine(pipe, cfg).start()
        try:
            rest = await collect(await engine.resume(token, got.end_frame))
            return torch.cat([got.frames, frames_of(rest)])
        finally:
            engine.stop()

    ref = asyncio.run(uninterrupted())
    never = generate_video(pipe, pipe.sampler("ddim", 3), image=None, num_frames=25, seed=5, prompt=first)
    assert (ref.int() - never.int()).abs().max() > 8  # the switch took effect
    token, got = asyncio.run(before_restart())
    assert len(list(tmp_path.glob("*.pt"))) == 1
    out = asyncio.run(after_restart(token, got))
    assert out.shape == ref.shape and (out.int() - ref.int()).abs().max() <= 1


def test_a_prompt_for_a_video_model_fails_its_session(pipe):
    video = load_pipeline("random:tiny", device="cpu")

    async def main():
        engine = Engine(video, config(max_sessions=2, max_batch=2)).start()
        try:
            handle = await engine.start_session(SessionParams(pace="max", seed=1, steps=2, num_frames=9,
                                                              prompt=prompt(pipe, 1, 4)))  # fmt: skip
            with pytest.raises(Exception, match="takes no text"):
                await collect(handle)
        finally:
            engine.stop()

    asyncio.run(main())


def test_a_failing_prompt_switch_fails_its_session_alone(pipe, monkeypatch):
    async def main():
        engine = Engine(pipe, config(max_sessions=4, max_batch=4)).start()
        try:
            other = await engine.start_session(SessionParams(pace="max", seed=1, steps=2, num_frames=25,
                                                             prompt=prompt(pipe, 1, 4)))  # fmt: skip
            victim = await engine.start_session(SessionParams(pace="max", seed=2, steps=2, prompt=prompt(pipe, 2, 4)),
                                                auto_ack=False)  # fmt: skip
            await victim.__aiter__().__anext__()

            def broken(*args, **kwargs):
                raise RuntimeError("device lost")

            monkeypatch.setattr(engine.runner, "set_prompt", broken)
            victim.set_prompt(prompt(pipe, 3, 4))
            with pytest.raises(SessionFailed, match="prompt switch failed"):
                async for _ in victim:
                    pass
            frames = sum(clip.num_frames for clip in await collect(other))
            return frames, engine.alive
        finally:
            engine.stop()

    frames, alive = asyncio.run(main())
    assert frames == 25 and alive


def test_a_switch_asked_for_while_unloaded_is_what_a_save_keeps(pipe):
    """A resumed session waiting for its rebuild takes a prompt switch: saving it again (a detach, a shutdown) keeps
    that switch, not the older one its unloaded state had."""
    from ca2vdm.server.engine.runner import ModelRunner
    from ca2vdm.server.engine.session import Session

    runner = ModelRunner(pipe, config(max_sessions=2, max_batch=2))
    s = Session(SessionParams(seed=3, steps=2, prompt=prompt(pipe, 1, 4)))
    runner.prefill([s])
    runner.set_prompt(s, prompt(pipe, 2, 4), recache=False)
    runner.unload(s)
    assert runner.host_state(s).pending[0].text == "prompt 2"
    runner.set_prompt(s, prompt(pipe, 3, 4), recache=True)  # while it waits for its rebuild
    state = runner.host_state(s)
    assert state.pending[0].text == "prompt 3" and state.pending[1] is True
    assert state.nbytes > dataclasses.replace(state, pending=None).nbytes  # the pending prompt's features count
