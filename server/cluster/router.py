"""Which engine replica a call goes to: Ray Serve's request-router extension point, with our routing rules.

Every call the ingress makes to the engine deployment carries a `route` keyword (a `Route`):
- a new session goes to the replica with the most real-time capacity to spare (`spare` in the routing stats each
  replica publishes, less the sessions this router sent it since), never to one named in `avoid` (it refused, being
  full) nor to one that is draining; replicas with nothing to spare come last, so `server_busy` is answered only
  when every replica is full;
- a call about an existing session (ack, stop, detach, resume) goes to the replica named in the session id or
  resume token (`<replica id>-...`, `<replica id>.`...) — that replica holds its cache pages. When it is gone, a
  resume goes to any replica (which takes the session's saved frames, if its replica left them); other calls go
  anywhere and find nothing to do.
- `replica` set: that replica (the one now holding a session; each replica in turn for /metrics). When it is gone
  the call goes anywhere, and the replica that gets it answers for itself (the caller checks who answered).

The router also writes down who the replicas are (`membership`), as Serve tells it. Nothing here is state of our
own outside Ray: all of it comes from Serve.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import membership


@dataclass(frozen=True)
class Route:
    """How to route one call (see the module docstring)."""

    session: str | None = None  # a session id or resume token: to the replica that holds it
    new: bool = False  # a new session: to the replica with the most to spare
    avoid: tuple[str, ...] = ()  # replicas that refused this session already
    replica: str | None = None  # this replica (if it is gone: any, which answers for itself)


def replica_of(key: str) -> str:
    """The replica id a session id or resume token starts with ('' when it names none)."""
    for sep in (".", "-"):
        head, found, _ = key.partition(sep)
        if found and head:
            return head
    return ""


class Ranking:
    """The routing rules on replica ids and their routing stats (what `SessionRouter` applies to Serve's replicas).
    It remembers how many new sessions it sent each replica since that replica's last stats: they lag a period, and
    without this a burst of sessions would all go to the replica that looked emptiest."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, dict]] = {}  # replica -> (sessions sent since, the stats they followed)

    def spare(self, replica: str, stats: dict) -> float:
        sent, seen = self._sent.get(replica, (0, stats))
        if seen != stats:  # fresh stats count what was sent before them
            sent = 0
        self._sent[replica] = (sent, stats)
        return float(stats.get("spare", 1)) - sent

    def choose(self, route: Route, replicas: dict[str, dict]) -> list[str]:
        """Replica ids in the order to try them: the one holding the session alone, if it is there; else most spare
        capacity first, replicas to avoid (they refused) or draining last."""
        home = route.replica or replica_of(route.session or "")
        if home in replicas:
            return [home]
        avoid = set(route.avoid)

        def key(rid: str) -> tuple:
            unwanted = rid in avoid or bool(replicas[rid].get("draining"))
            return (unwanted, -self.spare(rid, replicas[rid]), random.random())

        ranked = sorted(replicas, key=key)
        if route.new and ranked:
            sent, seen = self._sent[ranked[0]]
            self._sent[ranked[0]] = (sent + 1, seen)
        return ranked


class SessionRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._ranking = Ranking()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish(replicas)

    def _publish(self, replicas: list[RunningReplica]) -> None:
        membership.publish(self._deployment_id.name,
                           {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in replicas})  # fmt: skip

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> Sequence[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop while every replica is at its cap
        self._publish(self._replicas_list or candidate_replicas)
        route = (pending_request.kwargs.get("route") if pending_request is not None else None) or Route()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = self._ranking.choose(route, {rid: dict(r.routing_stats or {}) for rid, r in by_id.items()})
        return [[by_id[rid]] for rid in order]
