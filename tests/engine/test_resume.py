"""Detaching and resuming sessions in the engine (CPU, tiny model): an exact resume equals the uninterrupted stream
frame for frame and resends what was generated instead of generating it again; a rebuilt resume equals it before the
queue ever dequeued; detached sessions hold at most `max_detached_sessions` sessions' pages and give a waiting
session their slot; tokens are checked; sessions survive an engine restart."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.engine import Engine, SessionFailed
from ca2vdm.server.engine.session import SessionParams, SessionState
from tests.images import smooth_image

CHUNK = 8


@pytest.fixture(scope="module")
def pipe():
    from ca2vdm.server.model.loader import load_pipeline

    return load_pipeline("random:tiny", device="cpu")


def config(**kwargs) -> EngineConfig:
    base = {"max_lead_s": 3600.0, "max_pending_clips": 1, "max_sessions": 4, "max_batch": 4}
    return EngineConfig(**{**base, **kwargs})


def params(seed: int = 5, clips: int = 6, sampler: str = "ddim") -> SessionParams:
    steps = 5 if sampler == "dpm++2m" else 3  # 5: the multistep solver's middle steps are second order
    return SessionParams(image=smooth_image(16, 16, seed), seed=seed, steps=steps, num_frames=1 + CHUNK * clips,
                         sampler=sampler)  # fmt: skip


async def collect(handle) -> list:
    return [clip async for clip in handle]


async def take(handle, n: int, ack: bool = True) -> list:
    """The first n clips of a handle made with auto_ack=False (acknowledged if `ack`)."""
    clips, it = [], handle.__aiter__()
    for _ in range(n):
        clips.append(await it.__anext__())
        if ack:
            handle.ack(clips[-1].end_frame)
    return clips


def frames(clips) -> torch.Tensor:
    return torch.cat([c.frames for c in clips])


async def until(predicate, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def run(pipe, cfg, fn):
    async def main():
        engine = Engine(pipe, cfg).start()
        try:
            return await fn(engine)
        finally:
            engine.stop()

    return asyncio.run(main())


def reference(pipe, p: SessionParams) -> torch.Tensor:
    return run(pipe, config(), lambda e: _reference(e, p))


async def _reference(engine, p):
    return frames(await collect(await engine.start_session(p)))


def test_exact_resume_resends_and_equals_the_uninterrupted_stream(pipe):
    p = params()
    ref = reference(pipe, p)

    async def main(engine: Engine):
        handle = await engine.start_session(p, auto_ack=False, resumable=True)
        token = handle.info.resume_token
        got = await take(handle, 2) + await take(handle, 1, ack=False)  # the third arrived only in part: 3 frames
        k = got[2].first_frame + 3
        handle.detach()
        session = handle.session
        await until(lambda: session.state is SessionState.DETACHED)
        assert engine.num_detached == 1
        resumed = await engine.resume(token, k)
        assert resumed.info.first_frame == k and resumed.info.session_id == session.id
        rest = await collect(resumed)
        assert rest[0].first_frame == k and rest[0].index == got[2].index  # resent from k, trimmed
        assert engine.stats.resumes == {"exact": 1, "rebuilt": 0}
        # nothing was generated twice: the resent frames are the ones made before the drop
        assert engine.stats.frames_generated == ref.shape[0]
        return torch.cat([frames(got)[:k], frames(rest)])

    assert torch.equal(run(pipe, config(), main), ref)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])  # dpm++2m: its previous x0 estimate is kept too
def test_rebuilt_resume_before_the_first_dequeue_equals_the_uninterrupted_stream(pipe, sampler):
    p = params(seed=7, sampler=sampler)
    ref = reference(pipe, p)

    async def main(engine: Engine):
        handle = await engine.start_session(p, auto_ack=False, resumable=True)
        got = await take(handle, 2)
        k = got[-1].end_frame
        handle.detach()
        await until(lambda: engine.num_resumable == 1)  # grace 0: unloaded at once, pages freed
        assert engine.runner.num_free_pages == engine.runner.num_pages
        held = engine.runner.unloaded[handle.session.id]
        assert held.first_frame == 0, "this test is about a queue that never dequeued"
        rest = await collect(await engine.resume(handle.info.resume_token, k))
        assert engine.stats.resumes == {"exact": 0, "rebuilt": 1}
        return torch.cat([frames(got), frames(rest)])

    out = run(pipe, config(resume_grace_s=0.0), main)
    assert out.shape == ref.shape
    # one batched write instead of chunk by chunk: the same cache up to float rounding
    assert (out.int() - ref.int()).abs().max().item() <= 1


def test_rebuilt_resume_after_dequeues_goes_on_from_the_kept_history(pipe):
    p = params(seed=9, clips=8)

    async def main(engine: Engine):
        handle = await engine.start_session(p, auto_ack=False, resumable=True)
        got = await take(handle, 5)  # frame 0 and 4 chunks: 33 frames written, the queue holds the last 25
        handle.detach()
        await until(lambda: engine.num_resumable == 1)
        held = engine.runner.unloaded[handle.session.id]
        assert held.history.shape[2] == 25 and held.first_frame >= got[-1].end_frame - 25 - CHUNK
        rest = await collect(await engine.resume(handle.info.resume_token, got[-1].end_frame))
        return torch.cat([frames(got), frames(rest)])

    out = run(pipe, config(resume_grace_s=0.0), main)
    assert out.shape[0] == p.num_frames


def test_detached_sessions_hold_bounded_pages_and_give_way(pipe):
    """At most max_detached_sessions keep pages (the oldest are unloaded first); a waiting session takes the slot
    of a detached one."""

    async def main(engine: Engine):
        handles = []
        for i in range(4):
            h = await engine.start_session(params(seed=i, clips=20), auto_ack=False, resumable=True)
            await take(h, 1)
            handles.append(h)
        for h in handles:
            h.detach()
            await until(lambda h=h: h.session.state.is_detached)
        await until(lambda: engine.num_resumable == 2)
        assert engine.num_detached == 2
        assert [h.session.state for h in handles] == [SessionState.UNLOADED] * 2 + [SessionState.DETACHED] * 2
        per_session = engine.runner.num_pages // 4
        assert engine.runner.num_free_pages >= 2 * per_session
        # all slots would be taken by detached sessions: a new one gets the oldest detached one's slot
        fill = [await engine.start_session(params(seed=10 + i, clips=1)) for i in range(3)]
        for h in fill:
            await collect(h)
        assert engine.num_resumable >= 3
        # and every detached session can still be resumed (rebuilt)
        for h in handles:
            rest = await collect(await engine.resume(h.info.resume_token, 1))
            assert sum(c.num_frames for c in rest) == 1 + CHUNK * 20 - 1
        assert engine.runner.num_free_pages == engine.runner.num_pages

    run(pipe, config(max_detached_sessions=2, resume_grace_s=3600.0), main)


def test_resume_errors(pipe):
    async def main(engine: Engine):
        h = await engine.start_session(params(clips=20), auto_ack=False, resumable=True, owner="alice")
        got = await take(h, 2)
        h.detach()
        await until(lambda: h.session.state.is_detached)
        token = h.info.resume_token
        for kwargs, code in [({"token": "nope"}, "invalid_request"),
                             ({"owner": "mallory"}, "invalid_request"),
                             ({"from_frame": got[0].first_frame}, "invalid_request"),  # acknowledged, not held
                             ({"from_frame": 10**6}, "invalid_request")]:  # fmt: skip
            args = {"token": token, "from_frame": got[-1].end_frame, "owner": "alice", **kwargs}
            with pytest.raises(SessionFailed) as err:
                await engine.resume(args.pop("token"), args.pop("from_frame"), **args)
            assert err.value.code == code, kwargs
        # a session not started as resumable has no token
        plain = await engine.start_session(params(seed=2, clips=1))
        assert plain.info.resume_token is None
        await collect(plain)
        return token

    async def expired(engine: Engine):
        h = await engine.start_session(params(clips=20), auto_ack=False, resumable=True)
        await take(h, 1)
        h.detach()
        await until(lambda: engine.stats.resume_expired == 1)  # kept 0 s once unloaded: dropped
        with pytest.raises(SessionFailed) as err:
            await engine.resume(h.info.resume_token, 1)
        assert err.value.code == "expired"
        assert engine.runner.num_free_pages == engine.runner.num_pages

    run(pipe, config(), main)
    run(pipe, config(resume_grace_s=0.0, resume_keep_s=0.0), expired)


def test_a_resume_takes_over_an_attached_session(pipe):
    p = params(seed=3)
    ref = reference(pipe, p)

    async def main(engine: Engine):
        old = await engine.start_session(p, auto_ack=False, resumable=True)
        got = await take(old, 2)
        new = await engine.resume(old.info.resume_token, got[-1].end_frame)
        with pytest.raises(SessionFailed) as err:
            await collect(old)
        assert err.value.code == "replaced"
        old.cancel()  # the replaced connection's clean-up must not end the session
        rest = await collect(new)
        return torch.cat([frames(got), frames(rest)])

    assert torch.equal(run(pipe, config(), main), ref)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sessions_survive_an_engine_restart(pipe, tmp_path, sampler):
    p = params(seed=4, sampler=sampler)
    ref = reference(pipe, p)
    cfg = config(resume_dir=str(tmp_path))

    async def first(engine: Engine):
        h = await engine.start_session(p, auto_ack=False, resumable=True, owner="k")
        got = await take(h, 1) + await take(h, 2, ack=False)  # clips 1 and 2 unacknowledged: saved with it
        await until(lambda: h.session.state is SessionState.PAUSED)
        return h.info.resume_token, got

    token, got = run(pipe, cfg, first)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    async def second(engine: Engine):
        assert engine.num_resumable == 1 and not list(tmp_path.glob("*.pt"))  # read back and consumed
        k = got[1].first_frame + 2
        rest = await collect(await engine.resume(token, k, owner="k"))
        assert rest[0].first_frame == k
        return torch.cat([frames(got)[:k], frames(rest)])

    out = run(pipe, cfg, second)
    assert out.shape == ref.shape
    assert (out.int() - ref.int()).abs().max().item() <= 1


def test_unloaded_sessions_hold_bounded_host_memory(pipe):
    """Beyond max_resumable_bytes the oldest unloaded sessions are dropped (their resume is `expired`)."""

    async def measure(engine: Engine):
        h = await engine.start_session(params(seed=1, clips=20), auto_ack=False, resumable=True)
        await take(h, 1)
        h.detach()
        await until(lambda: engine.num_resumable == 1)
        return engine.resumable_bytes

    one = run(pipe, config(resume_grace_s=0.0), measure)
    assert one > 0

    async def flood(engine: Engine):
        handles = []
        for i in range(3):
            h = await engine.start_session(params(seed=i, clips=20), auto_ack=False, resumable=True)
            await take(h, 1)
            h.detach()
            await until(lambda h=h: h.session.state.is_detached or h.session.state.is_finished)
            handles.append(h)
        await until(lambda: engine.stats.resume_expired == 1)
        assert engine.num_resumable == 2 and engine.resumable_bytes <= 2 * one + one // 2
        with pytest.raises(SessionFailed) as err:  # the oldest went first
            await engine.resume(handles[0].info.resume_token, 1)
        assert err.value.code == "expired"
        rest = await collect(await engine.resume(handles[2].info.resume_token, 1))
        assert rest and engine.resumable_bytes <= one + one // 2

    run(pipe, config(resume_grace_s=0.0, max_resumable_bytes=2 * one + one // 2), flood)


def test_engines_sharing_a_directory_hand_sessions_over(pipe, tmp_path):
    """A cluster's replicas (id prefixes "a" and "b") share the directory: "a" stops, saving its session; "b" reads
    nothing at start, then takes the session's file when a resume with its token reaches it, and gives it a token of
    its own (so that later resumes are routed to it; the session id stays). The video goes on from the saved
    frames."""
    p = params(seed=6)
    ref = reference(pipe, p)
    shared = {"resume_dir": str(tmp_path), "shared_resume_dir": True}

    async def on_a(engine: Engine):
        h = await engine.start_session(p, auto_ack=False, resumable=True, owner="k")
        got = await take(h, 2)
        assert h.id.startswith("a-s") and h.info.resume_token.startswith("a.")
        return h.info.resume_token, got

    token, got = run(pipe, config(id_prefix="a", **shared), on_a)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    async def on_b(engine: Engine):
        assert engine.num_resumable == 0  # a shared directory is not read back at start
        with pytest.raises(SessionFailed) as foreign:
            await engine.resume(token, got[-1].end_frame, owner="someone else")
        assert foreign.value.code == "invalid_request" and len(list(tmp_path.glob("*.pt"))) == 1  # put back
        h = await engine.resume(token, got[-1].end_frame, owner="k")
        assert not list(tmp_path.glob("*.pt"))  # taken: no other engine can resume it again
        assert h.id.startswith("a-s") and h.info.resume_token.startswith("b.") and h.info.resume_token != token
        rest = await collect(h)
        with pytest.raises(SessionFailed):  # the old token is gone with the old replica
            await engine.resume(token, 0, owner="k")
        return torch.cat([frames(got), frames(rest)])

    out = run(pipe, config(id_prefix="b", **shared), on_b)
    assert out.shape == ref.shape
    assert (out.int() - ref.int()).abs().max().item() <= 1
