"""What the engine can deliver in real time, from the step times it measures while it runs.

A live session plays at the model's fps, so each second of its video costs `steps * fps / chunk_frames` rows of
denoising forward (one row = one session in one batched forward) plus `fps / chunk_frames` chunk ends (decode and
cache write). A batched forward of b rows takes `step_time(b)`; measured (exponential average per batch size, from
the warm-up and then from every step the engine runs), interpolated between measured sizes, and extrapolated
proportionally beyond them (pessimistic: per-row cost never falls past the largest size measured).

With n live sessions the engine runs them in batches of at most `max_batch`, so one second of everyone's video
costs `load(n) = sum_i (steps_i * step_time(b) / b + chunk_time(b) / b) * fps / chunk_frames` seconds of engine time,
b = min(n, max_batch). A set of sessions fits in real time when that is at most `target` (e.g. 0.9: a tenth kept
for jitter and for background work).
"""

from __future__ import annotations

import bisect
import threading


class _Ewma:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value, self.count = alpha, 0.0, 0

    def add(self, x: float) -> None:
        self.value = x if self.count == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


def _estimate(table: dict[int, _Ewma], b: int) -> float | None:
    """Time at batch size b from the measured sizes (interpolated, or proportional beyond them)."""
    sizes = sorted(table)
    if not sizes:
        return None
    if b in table:
        return table[b].value
    i = bisect.bisect_left(sizes, b)
    if i == 0:
        return table[sizes[0]].value  # smaller than anything measured: no cheaper than the smallest
    if i == len(sizes):
        hi = sizes[-1]
        return table[hi].value * b / hi
    lo, hi = sizes[i - 1], sizes[i]
    w = (b - lo) / (hi - lo)
    return (1 - w) * table[lo].value + w * table[hi].value


class CapacityModel:
    """Measured step times and the real-time load of a set of live sessions. Thread-safe (the engine thread writes,
    metrics and admission read)."""

    def __init__(self, fps: int, chunk_frames: int, max_batch: int, target: float) -> None:
        self.fps, self.chunk_frames, self.max_batch, self.target = fps, chunk_frames, max_batch, target
        # per phase, batch size -> seconds: "step" (a denoising forward and sampler update), "decode" and "write"
        # (the end of a chunk: frames out, then the chunk into the cache)
        self._tables: dict[str, dict[int, _Ewma]] = {"step": {}, "decode": {}, "write": {}}
        self._lock = threading.Lock()

    def record(self, phase: str, batch_size: int, seconds: float) -> None:
        with self._lock:
            self._tables[phase].setdefault(batch_size, _Ewma()).add(seconds)

    @property
    def is_measured(self) -> bool:
        with self._lock:
            return bool(self._tables["step"])

    def step_time(self, batch_size: int) -> float | None:
        with self._lock:
            return _estimate(self._tables["step"], batch_size)

    def chunk_time(self, batch_size: int) -> float:
        """Decode and cache write of `batch_size` chunks that finish together."""
        with self._lock:
            return sum(_estimate(self._tables[p], batch_size) or 0.0 for p in ("decode", "write"))

    def snapshot(self) -> dict[str, dict[int, float]]:
        """The measured times: phase -> batch size -> seconds (the averages the estimates start from)."""
        with self._lock:
            return {phase: {b: e.value for b, e in sorted(t.items())} for phase, t in self._tables.items()}

    def load(self, steps: list[int]) -> float | None:
        """Engine seconds per second of video for live sessions with these step counts (None: not measured)."""
        if not steps:
            return 0.0
        b = min(len(steps), self.max_batch)
        step = self.step_time(b)
        if step is None:
            return None
        per_row, per_chunk = step / b, self.chunk_time(b) / b
        return sum(s * per_row + per_chunk for s in steps) * self.fps / self.chunk_frames

    def fits(self, steps: list[int]) -> bool:
        """Whether live sessions with these step counts all keep real time (unmeasured: yes, the warm-up measures)."""
        load = self.load(steps)
        return load is None or load <= self.target

    def sessions(self, steps: int, limit: int) -> int:
        """How many live sessions of `steps` steps per chunk fit in real time (at most `limit`)."""
        n = 0
        while n < limit and self.fits([steps] * (n + 1)):
            n += 1
        return n
