"""The engine's counters and histograms (Prometheus semantics, bounded memory): written by the engine thread, read
by the metrics endpoint at scrape time."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class Histogram:
    """Cumulative bucket counts (Prometheus semantics) in bounded memory."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0
        self.max = float("-inf")

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.max = max(self.max, value)


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# clip lateness = out - due: negative is early (the viewer's buffer), positive a stall
LATENESS = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
OUTCOMES = ("completed", "cancelled", "failed", "rejected", "slow_consumer")


@dataclass
class EngineStats:
    sessions_total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    frames_generated: int = 0
    steps: int = 0
    stalls: int = 0  # live clips out after their due time
    stall_seconds: float = 0.0  # the viewers' total wait
    batch_size: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64)))
    denoise_step_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    time_to_first_clip_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    clip_interval_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    clip_lateness_seconds: Histogram = field(default_factory=lambda: Histogram(LATENESS))
    resumes: dict[str, int] = field(default_factory=lambda: {"exact": 0, "rebuilt": 0})
    resume_expired: int = 0  # detached sessions dropped without being resumed
    resume_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))  # resume to first clip sent
    prompt_switches: dict[str, int] = field(default_factory=lambda: {"keep": 0, "recache": 0})  # mid-stream
