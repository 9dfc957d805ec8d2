"""Per-source CONNECT limits (issue 3, point 10): a flood from one address cannot wear the broker down.

Two limits, both per source address:
- CONNECT attempts: at most `attempts` within `window` seconds. Every CONNECT counts except one that
  authenticates as a device, so a device reconnecting is never limited, while failed CONNECTs and
  bootstrap sessions are. Refused attempts count too: a client that keeps hammering stays refused.
- Concurrent bootstrap (password-less) sessions: at most `bootstrap_sessions` at once.
Over the attempt limit, a CONNECT carrying a live token of ours still passes `PER_TOKEN` times per window.

Time is `time.monotonic` by default: these are transport limits, like the keep-alive, not token times.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_SOURCES = 10_000  # sources (and tokens) remembered at once; the stalest are forgotten first
PER_TOKEN = 3  # over-limit CONNECTs let through per live token and window


class ConnectLimiter:
    def __init__(self, attempts: int, window: float, bootstrap_sessions: int,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.bootstrap_sessions = bootstrap_sessions
        self._now = now
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._bootstrap: dict[str, int] = {}
        self._tokens: OrderedDict[str, deque[float]] = OrderedDict()

    def attempt(self, source: str) -> bool:
        """Counts one CONNECT attempt; False when the source has used up its attempts in the window."""
        now = self._now()
        times = self._seen.pop(source, None) or deque(maxlen=self.attempts)
        self._seen[source] = times  # most recent last
        if len(self._seen) > MAX_SOURCES:
            self._seen.popitem(last=False)
        limited = len(times) == self.attempts and times[0] > now - self.window
        times.append(now)
        return not limited

    def token_pass(self, jti: str | None) -> bool:
        """A CONNECT over its source's limit that carries a live token of ours: let it be verified, at most
        `PER_TOKEN` times per window for that token (a device reconnects a few times; a thief holding a
        leaked token but not its key would otherwise get unlimited fully checked attempts)."""
        if jti is None:
            return False
        now = self._now()
        times = self._tokens.pop(jti, None) or deque(maxlen=PER_TOKEN)
        self._tokens[jti] = times
        if len(self._tokens) > MAX_SOURCES:
            self._tokens.popitem(last=False)
        if len(times) == PER_TOKEN and times[0] > now - self.window:
            return False
        times.append(now)
        return True

    def refund(self, source: str) -> None:
        """The attempt authenticated as a device: it does not count against the source."""
        times = self._seen.get(source)
        if times:
            times.pop()

    def bootstrap_allowed(self, source: str) -> bool:
        return self._bootstrap.get(source, 0) < self.bootstrap_sessions

    def bootstrap_opened(self, source: str) -> None:
        self._bootstrap[source] = self._bootstrap.get(source, 0) + 1

    def bootstrap_closed(self, source: str) -> None:
        left = self._bootstrap.get(source, 0) - 1
        if left > 0:
            self._bootstrap[source] = left
        else:
            self._bootstrap.pop(source, None)
