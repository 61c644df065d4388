"""The engine on CPU with the tiny pixel model: equality with the offline loop, batch independence, fairness,
admission, cancellation, backpressure, faults."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, ServerBusy, SessionFailed
from ca2vdm.server.engine.runner import ModelRunner
from ca2vdm.server.engine.session import Session, SessionParams, SessionState
from ca2vdm.server.model.generate import generate_video
from ca2vdm.server.model.loader import load_pipeline
from tests.images import smooth_image


def image(seed: int) -> torch.Tensor:
    return smooth_image(16, 16, seed)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("random:tiny", device="cpu")


def run(coro):
    return asyncio.run(coro)


def fast(**kwargs) -> EngineConfig:
    """A config for tests that are not about pacing: live sessions may run as far ahead of their viewers as they
    like (the tiny model is far faster than real time)."""
    return EngineConfig(max_lead_s=3600.0, **kwargs)


async def collect(handle):
    return [clip async for clip in handle]


async def with_engine(pipe, config, fn):
    engine = Engine(pipe, config).start()
    try:
        return await fn(engine)
    finally:
        engine.stop()


def test_runner_batch_equals_alone(pipe):
    """Latents of each session after several steps are the same alone or batched (fp32, < 1e-5)."""
    cfg = EngineConfig(max_sessions=4, max_batch=4)
    params = [SessionParams(image=image(i), seed=i, sampler=s, steps=n, num_frames=40)
              for i, (s, n) in enumerate([("ddim", 4), ("iddpm", 5), ("iddpm", 3), ("dpm++2m", 6)])]  # fmt: skip

    def advance(sessions, runner, steps):
        runner.prefill(sessions)
        for _ in range(steps):
            live = [s for s in sessions if runner.states[s.id].step >= 0]
            done = runner.denoise(live)
            assert done == [s for s in live if runner.states[s.id].step < 0]
            if done:
                runner.decode_chunks(done, [8] * len(done))
                runner.continue_chunks(done)
        return [runner.states[s.id] for s in sessions]

    batched = advance([Session(p) for p in params], ModelRunner(pipe, cfg), 9)
    for p, b in zip(params, batched, strict=True):
        (alone,) = advance([Session(p)], ModelRunner(pipe, cfg), 9)
        assert alone.step == b.step and alone.pages.num_written == b.pages.num_written
        assert ((alone.x - b.x).norm() / alone.x.norm()).item() < 1e-5


def test_a_multistep_session_unloaded_mid_chunk_goes_on_from_its_previous_estimate(pipe):
    """dpm++2m reads the previous step's x0 estimate: unloading a session between two steps of a chunk (to host
    memory, as a detached or saved session) keeps it, so the rebuilt session's chunk equals the uninterrupted one."""
    p = SessionParams(image=image(1), seed=3, sampler="dpm++2m", steps=6, num_frames=40)

    def run_steps(runner, session, n):
        for _ in range(n):
            runner.denoise([session])

    whole, session = ModelRunner(pipe, EngineConfig(max_sessions=1, max_batch=1)), Session(p)
    whole.prefill([session])
    run_steps(whole, session, 5)
    broken, again = ModelRunner(pipe, EngineConfig(max_sessions=1, max_batch=1)), Session(p)
    broken.prefill([again])
    run_steps(broken, again, 3)
    broken.unload(again)
    assert again.id in broken.unloaded and broken.unloaded[again.id].x0_prev is not None
    broken.prefill([again])  # rebuilds from host memory
    run_steps(broken, again, 2)
    a, b = whole.states[session.id], broken.states[again.id]
    assert a.step == b.step == 0
    assert ((a.x - b.x).norm() / a.x.norm()).item() < 1e-4


def test_session_equals_offline_generation(pipe):
    async def main(engine):
        params = SessionParams(image=image(3), seed=11, sampler="iddpm", steps=5, num_frames=19)
        clips = await collect(await engine.start_session(params))
        return torch.cat([c.frames for c in clips]), clips

    frames, clips = run(with_engine(pipe, fast(), main))
    offline = generate_video(pipe, pipe.sampler("iddpm", 5), image=image(3), num_frames=19, seed=11)
    assert [c.num_frames for c in clips] == [1, 8, 8, 2]
    assert [c.first_frame for c in clips] == [0, 1, 9, 17]
    assert torch.equal(frames, offline)


def test_many_sessions_batched_fairly(pipe):
    """8 sessions, batches of 3: all complete, each equals its solo run (frames within 1 level)."""

    async def main(engine):
        handles = [
            await engine.start_session(
                SessionParams(
                    image=image(i) if i % 3 else None,
                    seed=i,
                    steps=3 + i % 3,
                    num_frames=9 + i,
                    sampler=("iddpm", "ddim", "dpm++2m")[i % 3],
                )  # fmt: skip
            )
            for i in range(8)
        ]
        results = await asyncio.gather(*(collect(h) for h in handles))
        return results, engine.stats, engine.runner.num_free_pages, engine.runner.num_pages

    results, stats, free, total = run(with_engine(pipe, fast(max_sessions=6, max_batch=3), main))
    assert free == total
    assert stats.batch_size.max == 3 and stats.sessions_total["completed"] == 8
    for i, clips in enumerate(results):
        frames = torch.cat([c.frames for c in clips])
        assert frames.shape[0] == 9 + i
        solo = generate_video(pipe, pipe.sampler(("iddpm", "ddim", "dpm++2m")[i % 3], 3 + i % 3),
                              image=image(i) if i % 3 else None, num_frames=9 + i, seed=i)  # fmt: skip
        assert (frames.int() - solo.int()).abs().max() <= 1


def test_admission_waits_then_refuses(pipe):
    async def main(engine):
        cfg = dict(seed=0, steps=2, num_frames=None)
        a = await engine.start_session(SessionParams(**cfg))
        b = await engine.start_session(SessionParams(**cfg))  # waits: one session at a time
        with pytest.raises(ServerBusy):
            await engine.start_session(SessionParams(**cfg))
        it = a.__aiter__()
        await it.__anext__()
        assert b.state is SessionState.WAITING
        a.cancel()
        clip = await b.__aiter__().__anext__()  # b is admitted once a is gone
        b.cancel()
        return clip, engine.stats.sessions_total

    clip, totals = run(with_engine(pipe, fast(max_sessions=1, max_batch=1, max_waiting=1), main))
    assert clip.num_frames == 8 and totals["rejected"] == 1


def test_cancel_frees_pages_at_once(pipe):
    async def main(engine):
        handles = [await engine.start_session(SessionParams(seed=i, steps=2)) for i in range(3)]
        for h in handles:
            await h.__aiter__().__anext__()
        held = engine.runner.num_pages - engine.runner.num_free_pages
        for h in handles:
            h.cancel()
        for _ in range(100):
            if engine.runner.num_free_pages == engine.runner.num_pages:
                break
            await asyncio.sleep(0.01)
        return held, engine.runner.num_free_pages, engine.runner.num_pages, engine.stats.sessions_total

    held, free, total, totals = run(with_engine(pipe, fast(max_sessions=4), main))
    assert held > 0 and free == total and totals["cancelled"] == 3


def test_slow_consumer_pauses_only_itself(pipe):
    async def main(engine):
        slow = await engine.start_session(SessionParams(seed=1, steps=2))  # never read for a while
        fast = await engine.start_session(SessionParams(seed=2, steps=2, num_frames=80))
        fast_clips = await collect(fast)
        paused_state = slow.state
        produced = engine.stats.frames_generated
        slow_clips = []
        async for clip in slow:  # draining resumes it
            slow_clips.append(clip)
            if len(slow_clips) == 6:
                slow.cancel()
        return fast_clips, paused_state, produced, slow_clips

    fast_clips, paused_state, produced, slow_clips = run(with_engine(pipe, fast(max_pending_clips=2), main))
    assert sum(c.num_frames for c in fast_clips) == 80
    assert paused_state is SessionState.PAUSED
    assert produced == 80 + 8  # the slow session, which has taken nothing yet, stopped after its first clip
    assert len(slow_clips) >= 6


def test_fault_fails_only_that_batch(pipe):
    async def main(engine):
        calls = {"n": 0}

        def hook(stage, sessions):
            if stage == "denoise" and any(s.params.seed == 66 for s in sessions):
                calls["n"] += 1
                raise RuntimeError("injected fault")

        bad = await engine.start_session(SessionParams(seed=66, steps=2, num_frames=9))
        await asyncio.sleep(0)
        engine.fault_hook = hook
        with pytest.raises(SessionFailed, match="injected fault"):
            await collect(bad)
        good = await engine.start_session(SessionParams(seed=1, steps=2, num_frames=9))
        clips = await collect(good)
        return calls["n"], clips, engine.alive, engine.stats.sessions_total, engine.runner.num_free_pages

    n, clips, alive, totals, free = run(with_engine(pipe, fast(max_batch=1), main))
    assert n == 1 and alive and sum(c.num_frames for c in clips) == 9
    assert totals["failed"] == 1 and totals["completed"] == 1


def test_fmp4_stream_decodes(pipe, tmp_path):
    from ca2vdm.server.media import read_video

    async def main(engine):
        handle = await engine.start_session(SessionParams(image=image(0), seed=0, steps=2, num_frames=17,
                                                          format="fmp4"))  # fmt: skip
        clips = await collect(handle)
        return handle.info, clips

    info, clips = run(with_engine(pipe, fast(), main))
    assert info.mime.startswith("video/mp4") and info.init_segment
    path = tmp_path / "stream.mp4"
    path.write_bytes(info.init_segment + b"".join(c.media[0] for c in clips))
    assert read_video(path).shape[0] == 17


@pytest.mark.parametrize("max_sessions", [1, 3])
def test_warm_up_runs_every_phase_measures_it_and_gives_all_pages_back(pipe, max_sessions):
    runner = ModelRunner(pipe, EngineConfig(max_sessions=max_sessions, max_batch=max_sessions))
    calls = []
    for name in ("prefill", "denoise", "decode_chunks", "continue_chunks"):
        fn = getattr(runner, name)
        setattr(runner, name, lambda *a, _fn=fn, _name=name, **k: calls.append((_name, len(a[0]))) or _fn(*a, **k))
    samples = runner.warm_up()

    def phases(n, steps):
        return [("prefill", n)] + [("denoise", n)] * steps + [("decode_chunks", n), ("continue_chunks", n)]

    warm = [1] if max_sessions == 1 else [1, 2]  # two sessions only where the pool holds two
    measured = [1] if max_sessions == 1 else [1, 2, 3]  # and the largest batch, warm, timed
    assert calls == [c for n in warm for c in phases(n, 1)] + [c for n in measured for c in phases(n, 3)]
    assert sorted({(phase, n) for phase, n, _ in samples}) == sorted(
        (phase, n) for phase in ("decode", "step", "write") for n in measured
    )
    assert all(seconds > 0 for _, _, seconds in samples)
    assert runner.num_free_pages == runner.num_pages
    assert runner.pages.prefix.num_free == runner.pages.prefix.num_pages


def test_a_failed_warm_up_fails_start(pipe):
    engine = Engine(pipe, EngineConfig(max_sessions=1, max_batch=1))

    def broken():
        raise RuntimeError("no codec today")

    engine.runner.warm_up = broken
    with pytest.raises(RuntimeError, match="warm-up failed"):
        engine.start()
    assert not engine.alive


# ---- real time: pacing, stalls, admission, background work, acknowledgements ---------------------------------


def test_a_live_session_runs_at_most_max_lead_ahead_of_its_viewer(pipe):
    """25 frames: the image, then 3 clips of 8 due 0, 1 and 2 s after the first generated clip. With a 0.25 s lead
    the last clip cannot start before 1.75 s; at pace "max" the whole stream takes a fraction of that."""

    async def main(engine):
        times = {}
        for pace in ("realtime", "max"):
            handle = await engine.start_session(SessionParams(image=image(1), seed=1, steps=2, num_frames=25,
                                                              pace=pace))  # fmt: skip
            clips = []
            async for clip in handle:
                clips.append((time.monotonic(), clip))
            times[pace] = clips
        return times, engine.stats.stalls

    times, stalls = run(with_engine(pipe, EngineConfig(max_lead_s=0.25), main))
    live, background = times["realtime"], times["max"]
    assert live[-1][0] - live[1][0] >= 1.7 and background[-1][0] - background[1][0] < 1.0
    assert [c.ahead_ms is None for _, c in live] == [True, True, False, False]  # no clock before the first clip
    assert all(c.ahead_ms > -100 for _, c in live[2:]) and stalls == 0
    assert all(c.ahead_ms is None for _, c in background)


def test_a_late_clip_is_a_stall_and_moves_the_viewers_clock(pipe):
    async def main(engine):
        calls = {"n": 0}

        def slow_step(stage, sessions):
            if stage == "denoise":
                calls["n"] += 1
                if calls["n"] == 4:  # in the second generated chunk: it comes out ~1.2 s late
                    time.sleep(2.2)

        engine.fault_hook = slow_step
        handle = await engine.start_session(SessionParams(seed=2, steps=2, num_frames=32))
        clips = await collect(handle)
        return clips, engine.stats

    clips, stats = run(with_engine(pipe, EngineConfig(max_lead_s=0.5), main))
    assert stats.stalls == 1 and 0.9 < stats.stall_seconds < 2.2
    assert clips[1].ahead_ms < -900 and all(c.ahead_ms > -100 for c in clips[2:])  # the clock moved on
    assert stats.clip_lateness_seconds.count == 3


def test_without_acknowledgements_a_remote_consumer_pauses_its_session(pipe):
    """A remote consumer that has acknowledged nothing gets its first clip only (a client that never reads costs one
    clip), then up to max_pending_clips unacknowledged once it acknowledges."""

    async def main(engine):
        handle = await engine.start_session(SessionParams(seed=3, steps=2), auto_ack=False)
        it = handle.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 10)
        await asyncio.sleep(0.5)
        probation = handle.state, engine.stats.frames_generated
        handle.ack(first.end_frame)  # now up to 2 unacknowledged: three more clips, then a pause again
        more = [await asyncio.wait_for(it.__anext__(), 10) for _ in range(3)]
        await asyncio.sleep(0.5)
        window = handle.state, engine.stats.frames_generated
        handle.ack(more[-1].end_frame)
        fifth = await asyncio.wait_for(it.__anext__(), 10)
        handle.cancel()
        return probation, window, fifth

    probation, window, fifth = run(with_engine(pipe, fast(max_pending_clips=2), main))
    assert probation == (SessionState.PAUSED, 8) and window == (SessionState.PAUSED, 32) and fifth.first_frame == 32


def test_live_sessions_beyond_real_time_capacity_wait_then_get_server_busy(pipe):
    async def main(engine):
        first = await engine.start_session(SessionParams(seed=4, steps=2))
        reading = asyncio.create_task(collect(first))  # a viewer that keeps up: it keeps its real-time share
        await asyncio.sleep(0.2)
        second = await engine.start_session(SessionParams(seed=5, steps=2))
        with pytest.raises(SessionFailed) as err:
            await asyncio.wait_for(collect(second), 10)
        first.cancel()
        await reading
        return err.value, engine.stats.sessions_total, engine.realtime_capacity(2)

    # a target no session can meet: the first live session is served anyway, a second is refused
    config = fast(realtime_target=1e-6, admission_wait_s=0.3)
    err, totals, capacity = run(with_engine(pipe, config, main))
    assert err.code == "server_busy" and "retry" in str(err) and totals["rejected"] == 1 and capacity == 0


def test_background_sessions_complete_beside_live_ones_without_stalls(pipe):
    async def main(engine):
        live = await engine.start_session(SessionParams(seed=6, steps=2, num_frames=33))
        job = await engine.start_session(SessionParams(seed=7, steps=2, num_frames=41, pace="max"))
        return await asyncio.gather(collect(live), collect(job)), engine.stats

    (live, job), stats = run(with_engine(pipe, EngineConfig(max_lead_s=1.0), main))
    assert sum(c.num_frames for c in live) == 33 and sum(c.num_frames for c in job) == 41
    assert stats.stalls == 0 and stats.sessions_total["completed"] == 2


@pytest.mark.parametrize("max_batch", [1, 3, 8, 16, 17, 64])
def test_graph_buckets_cover_every_batch_with_little_padding(max_batch):
    from ca2vdm.server.engine.graphs import batch_buckets

    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
    for n in range(1, max_batch + 1):
        padded = next(b for b in buckets if b >= n)
        assert padded == n if n <= 16 else padded - n <= n / 8  # small batches exact, large ones within an eighth
