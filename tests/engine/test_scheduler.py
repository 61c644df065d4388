"""Scheduler policy without tensors, on a fake clock: admission (pages, background slots, real-time capacity),
earliest deadline first with first clips ahead, lead limiting, background work only in spare time, pausing slow
consumers, and ending sessions that wait or stall too long."""

from __future__ import annotations

import pytest
import torch

from ca2vdm.server.engine.capacity import CapacityModel
from ca2vdm.server.engine.config import EngineConfig
from ca2vdm.server.engine.scheduler import Scheduler
from ca2vdm.server.engine.session import Session, SessionParams, SessionState
from ca2vdm.server.model.prompt import Prompt

FPS, CHUNK = 8, 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(config: EngineConfig, step_times: dict[int, float] | None = None) -> tuple[Scheduler, Clock]:
    capacity = CapacityModel(FPS, CHUNK, config.max_batch, config.realtime_target)
    for b, t in (step_times or {}).items():
        capacity.record("step", b, t)
    clock = Clock()
    return Scheduler(config, capacity, FPS, clock), clock


def sessions(n: int, pace: str = "realtime", steps: int = 25) -> list[Session]:
    return [Session(SessionParams(seed=i, pace=pace, steps=steps), created_at=1000.0) for i in range(n)]


def start(sched: Scheduler, ss: list[Session]) -> None:
    """Admit and prefill: the sessions are generating, none has a clip out."""
    for s in ss:
        assert sched.add(s)
    sched.schedule()
    for s in ss:
        assert s.state is SessionState.PREFILLING
        s.state, s.steps_left = SessionState.GENERATING, s.params.steps


def playing(s: Session, clock_start: float, frames_done: int) -> None:
    """The session's viewer clock started at `clock_start` with frame 1; `frames_done` frames are out."""
    s.clock_start, s.clock_frame, s.frames_done = clock_start, 1, frames_done


def test_admission_and_refusal_by_pages():
    sched, _ = make(EngineConfig(max_sessions=2, max_batch=2, max_waiting=1))
    ss = sessions(4)
    assert [sched.add(s) for s in ss] == [True, True, True, False]
    plan = sched.schedule()
    assert plan.prefill == ss[:2] and sched.num_waiting == 1
    assert all(s.state is SessionState.PREFILLING for s in ss[:2]) and ss[2].state is SessionState.WAITING


def test_background_sessions_take_only_their_slots():
    sched, _ = make(EngineConfig(max_sessions=4, max_batch=4, max_background_sessions=2, max_waiting=8))
    jobs, live = sessions(3, pace="max"), sessions(2)
    for s in jobs + live:
        assert sched.add(s)
    plan = sched.schedule()
    assert set(plan.prefill) == {jobs[0], jobs[1], *live}  # the third job waits: live sessions keep their slots
    assert jobs[2].state is SessionState.WAITING


def test_live_admission_stops_at_real_time_capacity():
    # 25 steps at 8 fps with 8-frame chunks: 25 rows per second per session; 10 ms a row at any batch size
    # (100 rows/s) keeps 3 sessions in real time at a 0.9 target, not 4
    sched, clock = make(EngineConfig(max_sessions=8, max_batch=8, realtime_target=0.9, admission_wait_s=5),
                        {1: 0.01, 8: 0.08})  # fmt: skip
    ss = sessions(4)
    for s in ss:
        assert sched.add(s)
    sched.schedule()
    assert [s.state for s in ss] == [SessionState.PREFILLING] * 3 + [SessionState.WAITING]
    assert sched.capacity.sessions(25, 8) == 3
    assert sched.capacity.snapshot() == {"step": {1: 0.01, 8: 0.08}, "decode": {}, "write": {}}
    lone, _ = make(EngineConfig(max_sessions=8, max_batch=8), {1: 1.0})  # no session keeps real time: one gets in
    (x, y) = sessions(2)
    lone.add(x)
    lone.add(y)
    lone.schedule()
    assert (x.state, y.state) == (SessionState.PREFILLING, SessionState.WAITING)
    clock.now += 4
    assert not sched.schedule().expired
    clock.now += 2  # waited past admission_wait_s: refused with a retry hint
    plan = sched.schedule()
    assert [(s, code) for s, code, _ in plan.expired] == [(ss[3], "server_busy")]
    assert "retry" in plan.expired[0][2] and sched.num_waiting == 0


def test_first_clips_first_then_earliest_deadline():
    sched, clock = make(EngineConfig(max_sessions=8, max_batch=3))
    ss = sessions(5)
    start(sched, ss)
    now = clock.now
    playing(ss[0], now - 2, 1 + 3 * 8)  # due in 1 s
    playing(ss[1], now - 10, 1 + 10 * 8)  # due now
    playing(ss[2], now - 1, 1 + 4 * 8)  # due in 3 s
    # ss[3], ss[4] have no clip out yet: first
    assert sched.schedule().denoise == [ss[3], ss[4], ss[1]]
    playing(ss[3], now, 9)
    playing(ss[4], now, 9)  # both due in 1 s, like ss[0]
    batch = sched.schedule().denoise
    assert batch[0] is ss[1] and set(batch[1:]) <= {ss[0], ss[3], ss[4]} and ss[2] not in batch


def test_a_first_clip_runs_alone_while_the_others_can_wait_for_it():
    # 10 ms a step alone, 32 ms with 4 rows: the joiner's 25 steps alone take 0.25 s, after which all 4 run together
    # (25 steps of 32 ms: 0.8 s per chunk)
    sched, clock = make(EngineConfig(max_sessions=4, max_batch=4, deadline_margin_s=0.25), {1: 0.01, 4: 0.032})
    ss = sessions(4)
    start(sched, ss)
    joiner, old = ss[3], ss[:3]
    for i, s in enumerate(old):
        playing(s, clock.now - 1, 1 + 8 * 3 + i)  # about 2 s ahead of their viewers
    assert sched.schedule().denoise == [joiner]  # alone: its first clip in a quarter of a second
    # one is now barely ahead: waiting 0.25 s for the joiner, then 0.8 s in the full batch would make it late
    playing(old[1], clock.now - 1, 1 + 8 * 2)  # due in 1.0 s
    old[1].steps_left = 25
    assert sched.schedule().denoise == [joiner, old[1]]
    # the others' lead is used up: all run with it, earliest due first
    for s in old:
        playing(s, clock.now - 1, 1 + 8 * 2)
    batch = sched.schedule().denoise
    assert batch[0] is joiner and set(batch[1:]) == set(old)
    # no first clip in the batch: live sessions by due time as before
    playing(joiner, clock.now, 9)
    assert set(sched.schedule().denoise) == set(ss)


def test_a_session_ahead_of_its_viewer_by_more_than_the_lead_waits():
    sched, clock = make(EngineConfig(max_sessions=4, max_batch=4, max_lead_s=4.0))
    a, b = sessions(2)
    start(sched, [a, b])
    playing(a, clock.now, 1 + 5 * 8)  # 5 s of video out, the viewer is at 0 s: 5 s ahead
    playing(b, clock.now, 1 + 2 * 8)
    assert sched.schedule().denoise == [b]
    clock.now += 1.01  # now 3.99 s ahead: it runs again
    assert sched.schedule().denoise == [b, a]


def test_background_fills_only_spare_time():
    # a step takes 20 ms at 1 row and 40 ms at 2 rows: with 25 steps left, the live session needs 0.5 s alone and
    # 1 s with a job beside it
    sched, clock = make(EngineConfig(max_sessions=4, max_batch=4, deadline_margin_s=0.0, max_lead_s=10),
                        {1: 0.02, 2: 0.04, 4: 0.08})  # fmt: skip
    live, (job,) = sessions(1), sessions(1, pace="max")
    start(sched, live + [job])
    (s,) = live
    assert sched.schedule().denoise == [s]  # its first clip is not out: nothing beside it
    playing(s, clock.now - 0.1, 9)  # due in 0.9 s: 0.5 s alone fits, 1 s would not
    assert sched.schedule().denoise == [s]
    playing(s, clock.now - 1, 1 + 8 * 4)  # due in 3 s: the job may share the batch
    assert sched.schedule().denoise == [s, job]
    playing(s, clock.now, 1 + 8 * 12)  # 12 s ahead, more than the lead: the job runs alone
    assert sched.schedule().denoise == [job]


def test_background_round_robin_without_starvation():
    sched, _ = make(EngineConfig(max_sessions=10, max_batch=3, max_background_sessions=10))
    ss = sessions(10, pace="max")
    start(sched, ss)
    runs = {s.id: 0 for s in ss}
    for _ in range(10):
        for s in sched.schedule().denoise:
            runs[s.id] += 1
    assert set(runs.values()) == {3}  # 10 steps x 3 slots = 30 runs, evenly spread


def test_slow_consumer_is_paused_resumed_and_finally_ended():
    sched, clock = make(EngineConfig(max_sessions=2, max_batch=2, max_pending_clips=2, max_paused_s=30))
    a, b = sessions(2)
    start(sched, [a, b])
    for end in (9, 17, 25):
        a.add_unacked(end)
    assert sched.schedule().denoise == [b] and a.state is SessionState.PAUSED
    a.ack(9)
    assert a in sched.schedule().denoise and a.state is SessionState.GENERATING
    a.add_unacked(33)
    sched.schedule()
    clock.now += 29
    assert not sched.schedule().expired
    clock.now += 2
    plan = sched.schedule()
    assert [(s, code) for s, code, _ in plan.expired] == [(a, "slow_consumer")] and a not in sched.active


def test_pending_bytes_pause_too():
    sched, _ = make(EngineConfig(max_sessions=1, max_batch=1, max_pending_bytes=1000))
    (a,) = sessions(1)
    start(sched, [a])
    a.add_unacked(9)
    a.add_unacked_bytes(9, 1001)
    assert sched.schedule().denoise == [] and a.state is SessionState.PAUSED


def test_a_long_paused_session_is_evicted_when_another_waits():
    sched, clock = make(EngineConfig(max_sessions=1, max_batch=1, max_pending_clips=1, evict_paused_s=5))
    a, b = sessions(2)
    start(sched, [a])
    a.add_unacked(9)
    a.add_unacked(17)
    sched.schedule()
    clock.now += 10  # paused for 10 s, well under max_paused_s: kept while nobody waits
    assert not sched.schedule().expired
    assert sched.add(b)
    plan = sched.schedule()
    assert [(s, code) for s, code, _ in plan.expired] == [(a, "slow_consumer")]
    assert plan.prefill == [b]


def test_cancel_removes_waiting_and_active():
    sched, _ = make(EngineConfig(max_sessions=1))
    a, b = sessions(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.cancel_requested = b.cancel_requested = True
    assert set(sched.take_cancelled()) == {a, b} and sched.num_active == 0 and sched.num_waiting == 0


def test_a_cancelled_live_session_gives_up_its_capacity_before_it_is_removed():
    """What a cluster's replica reports as spare between a cancel and the next engine step."""
    sched, _ = make(EngineConfig(max_sessions=8, max_batch=8, realtime_target=0.8), {1: 0.01, 8: 0.08})
    ss = sessions(3)
    start(sched, ss)
    assert sched.live_steps() == [25, 25, 25]
    ss[1].cancel_requested = True
    assert sched.live_steps() == [25, 25] and sched.num_active == 3


@pytest.mark.parametrize("pace", ["fast", ""])
def test_unknown_pace_is_refused(pace):
    with pytest.raises(ValueError, match="unknown pace"):
        SessionParams(pace=pace)


def test_a_paused_live_session_gives_up_its_capacity_and_takes_it_back_only_if_it_fits():
    # 10 ms a row: one 25-step session is a load of 0.25, so three fit a 0.8 target and four do not
    sched, _ = make(EngineConfig(max_sessions=8, max_batch=8, realtime_target=0.8, max_pending_clips=1),
                    {1: 0.01, 8: 0.08})  # fmt: skip
    ss = sessions(4)
    start(sched, ss[:3])
    assert sched.add(ss[3])
    sched.schedule()
    assert ss[3].state is SessionState.WAITING
    for end in (9, 17):  # ss[0]'s client stops acknowledging: it pauses and ss[3] gets its share
        ss[0].add_unacked(end)
    sched.schedule()
    assert ss[0].state is SessionState.PAUSED and ss[3].state is SessionState.PREFILLING
    ss[3].state = SessionState.GENERATING
    ss[0].ack(17)  # caught up, but three others hold the capacity now
    sched.schedule()
    assert ss[0].state is SessionState.PAUSED
    ss[1].cancel_requested = True
    sched.take_cancelled()
    sched.schedule()
    assert ss[0].state is SessionState.GENERATING


def test_one_clients_sessions_never_evict_each_other():
    sched, clock = make(EngineConfig(max_sessions=1, max_batch=1, evict_paused_s=5))
    a, b, c = sessions(3)
    a.client = b.client = "10.0.0.1"
    c.client = "10.0.0.2"
    start(sched, [a])
    a.add_unacked(9)  # nothing acknowledged: paused after its first clip
    sched.schedule()
    assert a.state is SessionState.PAUSED
    sched.add(b)
    clock.now += 10
    assert not sched.schedule().expired  # b is a's own client's: no eviction in its favour
    sched.add(c)
    plan = sched.schedule()
    assert [s for s, _, _ in plan.expired] == [a] and plan.prefill == [c]  # fair admission: c before b


def guided(n: int, pace: str = "realtime") -> list[Session]:
    """Sessions with a guided prompt: two rows each (the unconditional branch too)."""
    prompt = Prompt("a red ball", torch.zeros(4, 8), torch.ones(4, dtype=torch.long), guidance_scale=7.0)
    return [Session(SessionParams(seed=i, pace=pace, prompt=prompt), created_at=1000.0) for i in range(n)]


def test_batches_and_slots_count_rows_not_sessions():
    sched, clock = make(EngineConfig(max_sessions=6, max_batch=4, max_waiting=4, max_lead_s=100))
    g, (plain,) = guided(2), sessions(1)
    start(sched, [*g, plain])  # 5 rows
    assert sched.rows_held == 5
    assert sched.schedule().denoise == g  # 4 rows: the plain session would make 5
    # a guided session waits for 2 rows where 1 is free: the detached plain session's row goes to it
    plain.state, plain.detached_at = SessionState.DETACHED, clock.now
    (w,) = guided(1)
    assert sched.add(w)
    plan = sched.schedule()
    assert plan.unload == [plain] and w.state is SessionState.PREFILLING and sched.rows_held == 6
