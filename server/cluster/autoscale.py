"""Autoscaling the engine replicas on our own signal: live sessions against real-time capacity.

Each replica reports `live_sessions` and `realtime_capacity` (`EngineReplica.record_autoscaling_stats`); Serve
averages them over its look-back window and calls `policy` on its controller. The policy wants enough replicas that
the live sessions fill `target_utilization` of their real-time capacity (a replica's capacity is the engine's own
measurement; until a replica has reported, nothing changes). It scales up
at once and down only after `downscale_periods` consecutive decisions asking for fewer, one replica at a time, so
that a brief lull does not cost a replica its sessions; the replica that leaves drains (router.py, replica.py).
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext


def desired_replicas(live: float, capacity_per_replica: float, current: int, target_utilization: float) -> int:
    """Replicas that hold `live` sessions at `target_utilization` of their capacity (at least one)."""
    if capacity_per_replica <= 0:
        return max(1, current)
    return max(1, math.ceil(live / (capacity_per_replica * target_utilization)))


class RealtimePolicy:
    """Serve's autoscaling policy for the engine deployment (`AutoscalingPolicy(policy_function=RealtimePolicy,
    policy_kwargs=...)`): Serve makes one instance, then calls it every control period."""

    def __init__(self, target_utilization: float = 0.8, downscale_periods: int = 30) -> None:
        if not 0 < target_utilization <= 1 or downscale_periods < 1:
            raise ValueError("target_utilization must be in (0, 1] and downscale_periods >= 1")
        self.target_utilization, self.downscale_periods = target_utilization, downscale_periods

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        metrics = ctx.aggregated_metrics or {}
        live = sum(metrics.get("live_sessions", {}).values())
        capacities = [c for c in metrics.get("realtime_capacity", {}).values() if c > 0]
        current = ctx.current_num_replicas
        if not capacities:  # no replica has reported yet
            return max(current, ctx.capacity_adjusted_min_replicas), state
        want = desired_replicas(live, sum(capacities) / len(capacities), current, self.target_utilization)
        want = min(max(want, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        if want >= current:
            state["low"] = 0
            return want, state
        state["low"] = state.get("low", 0) + 1
        if state["low"] < self.downscale_periods:
            return current, state
        state["low"] = 0
        return current - 1, state
