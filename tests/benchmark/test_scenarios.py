"""`ca2vdm bench` scenarios on the tiny model (CPU): they run and report what they claim."""

from __future__ import annotations

import torch

from ca2vdm.server.benchmark.scenarios import ar_steps_scenario


def test_ar_steps_compare_the_cached_and_recompute_paths_as_the_context_grows(tiny_pipe):
    rows = ar_steps_scenario(tiny_pipe, steps=5)
    assert [r["ar_step"] for r in rows] == list(range(5))
    # a condition frame, then 8-frame chunks, until the 25-frame queue is full
    assert [r["cached_frames"] for r in rows] == [1, 9, 17, 25, 25]
    for r in rows:
        assert all(r[k] > 0 and torch.isfinite(torch.tensor(r[k])) for k in ("denoise_ms", "write_ms", "recompute_ms"))
