"""Per client address: how many streams it holds, how fast it opens connections, and whether it has sent so many
invalid requests that it is shut out for a while. A flood of malformed messages, image bombs or oversized bodies from
one address then costs a refused connection each instead of a parse each, and a client that reconnects in a tight
loop costs an accept and a close per attempt beyond its rate."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .requests import Reject

_WINDOW_S = 60.0


class ClientGuard:
    def __init__(self, max_streams: int, max_invalid: int, ban_s: float, max_connections_per_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_streams, self.max_invalid, self.ban_s, self.clock = max_streams, max_invalid, ban_s, clock
        self.rate = max_connections_per_s
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, last refill)
        self._streams: Counter[str] = Counter()
        self._strikes: dict[str, deque[float]] = {}
        self._banned: dict[str, float] = {}  # address -> until

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One stream of `client` for the duration; Reject(server_busy) when it already holds `max_streams`."""
        if self.max_streams and self._streams[client] >= self.max_streams:
            raise Reject("server_busy", f"this address already has {self.max_streams} streams open")
        self._streams[client] += 1
        try:
            yield
        finally:
            self._streams[client] -= 1
            if not self._streams[client]:
                del self._streams[client]

    def strike(self, client: str, weight: int = 1) -> None:
        """`client` sent an invalid request (`weight` counts it as several); `max_invalid` within a minute shut it
        out for `ban_s`."""
        if not self.max_invalid:
            return
        now = self.clock()
        times = self._strikes.setdefault(client, deque())
        times.extend([now] * weight)
        while times and times[0] < now - _WINDOW_S:
            times.popleft()
        if len(times) >= self.max_invalid:
            self._banned[client] = now + self.ban_s
            del self._strikes[client]
        if len(self._strikes) > 10_000:  # bounded memory whatever the number of addresses
            self._strikes = {c: t for c, t in self._strikes.items() if t and t[-1] >= now - _WINDOW_S}

    def admit_connection(self, client: str) -> bool:
        """A new connection from `client`: False when it is shut out, or opens connections faster than
        `max_connections_per_s` (burst: twice that)."""
        if self.banned_for(client):
            return False
        if not self.rate:
            return True
        now = self.clock()
        tokens, last = self._buckets.get(client, (2 * self.rate, now))
        tokens = min(2 * self.rate, tokens + (now - last) * self.rate)
        if len(self._buckets) > 10_000:
            self._buckets.clear()
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1, now)
        return True

    def banned_for(self, client: str) -> float:
        """Seconds `client` stays shut out (0: it is not)."""
        until = self._banned.get(client)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._banned[client]
            return 0.0
        return left
