"""Who the replicas of each deployment are, as this process's request routers last heard from Serve.

Serve pushes replica membership (and each replica's routing stats) to every router; `router.SessionRouter` writes it
here and the rest of the process reads it: the ingress lists replicas for /metrics and readiness, and a replica
notices that it is leaving. A module of its own because Serve ships the router class by value (its module's globals
are a copy in the router), while this module is imported by name everywhere.
"""

from __future__ import annotations

import time

_members: dict[str, dict[str, dict]] = {}  # deployment -> {replica id: its last routing stats}
_updated: dict[str, float] = {}
_seen: dict[str, set[str]] = {}  # deployment -> every replica id it has had while this process watched (a few)


def publish(deployment: str, replicas: dict[str, dict]) -> None:
    _members[deployment] = replicas
    _seen.setdefault(deployment, set()).update(replicas)
    _updated[deployment] = time.monotonic()


def members(deployment: str) -> dict[str, dict]:
    """The running replicas of `deployment` this process's routers know, with their routing stats."""
    return dict(_members.get(deployment, {}))


def known(deployment: str) -> bool:
    """Has a router of this process heard of `deployment`'s replicas yet."""
    return deployment in _updated


def was_member(deployment: str, replica: str) -> bool:
    """Has `replica` been one of `deployment`'s replicas (now, or before it left or died)."""
    return replica in _seen.get(deployment, ())
