"""`ca2vdm bench --realtime` on the tiny model (CPU): the ramp, the hold with joiners, and a REST job at the held
load that finishes on spare capacity without a viewer stall."""

from __future__ import annotations

from ca2vdm.server.benchmark import realtime
from ca2vdm.server.benchmark.realtime import realtime_scenario


def test_realtime_bench_holds_viewers_and_runs_a_job_beside_them(tiny_pipe, monkeypatch):
    monkeypatch.setattr(realtime, "JOB_LIMIT_S", 60.0)
    result = realtime_scenario(tiny_pipe, floor_ms=1.0, steps=4, max_sessions=2, join_every_s=1.0, hold_s=2.0,
                               probes=1, job_frames=16)  # fmt: skip
    held = result["sessions_held"]
    assert held >= 1 and result["stalls_in_hold"] == 0, result  # 2 unless a busy machine's ramp stopped early
    assert len(result["holds"][-1]["joining_first_clip_s"]) == 1 and result["joining_first_clip_p50_s"] < 2.0
    job = result["job"]
    assert job["finished"] and job["frames_done"] == 16 and job["sessions"] == held
    assert job["stalls"] == 0, job
