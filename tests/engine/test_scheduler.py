"""Scheduler policy without tensors: admission limits, round-robin fairness, pausing slow consumers."""

from __future__ import annotations

from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.scheduler import Scheduler
from ca2vdm.server.engine.session import Session, SessionParams, SessionState


def sessions(n):
    return [Session(SessionParams(seed=i)) for i in range(n)]


def test_admission_and_refusal():
    sched = Scheduler(EngineConfig(max_sessions=2, max_batch=2, max_waiting=1))
    ss = sessions(4)
    assert [sched.add(s) for s in ss] == [True, True, True, False]
    plan = sched.schedule()
    assert plan.prefill == ss[:2] and sched.num_waiting == 1
    assert all(s.state is SessionState.PREFILLING for s in ss[:2]) and ss[2].state is SessionState.WAITING


def test_round_robin_no_starvation():
    sched = Scheduler(EngineConfig(max_sessions=10, max_batch=3))
    ss = sessions(10)
    for s in ss:
        sched.add(s)
    sched.schedule()
    for s in ss:
        s.state = SessionState.GENERATING
    runs = {s.id: 0 for s in ss}
    for _ in range(10):
        for s in sched.schedule().denoise:
            runs[s.id] += 1
    assert set(runs.values()) == {3}  # 10 steps x 3 slots = 30 runs, evenly spread


def test_slow_consumer_is_paused_and_resumed():
    sched = Scheduler(EngineConfig(max_sessions=2, max_batch=2, max_pending_clips=2))
    a, b = sessions(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.state = b.state = SessionState.GENERATING
    a.add_pending(3)
    assert sched.schedule().denoise == [b] and a.state is SessionState.PAUSED
    a.add_pending(-1)
    assert a in sched.schedule().denoise and a.state is SessionState.GENERATING


def test_cancel_removes_waiting_and_active():
    sched = Scheduler(EngineConfig(max_sessions=1))
    a, b = sessions(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.cancel_requested = b.cancel_requested = True
    assert set(sched.take_cancelled()) == {a, b} and sched.num_active == 0 and sched.num_waiting == 0
