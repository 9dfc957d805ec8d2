"""Per-source CONNECT limits (issue 3, point 10): a flood from one address cannot wear the broker down.

Two limits, both per source address:
- CONNECT attempts: at most `attempts` within `window` seconds. Every CONNECT counts except one that
  authenticates as a device, so a device reconnecting is never limited, while failed CONNECTs and
  bootstrap sessions are. Refused attempts count too: a client that keeps hammering stays refused.
- Concurrent bootstrap (password-less) sessions: at most `bootstrap_sessions` at once.

Time is `time.monotonic` by default: these are transport limits, like the keep-alive, not token times.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_SOURCES = 10_000  # sources remembered at once; the stalest are forgotten first


class ConnectLimiter:
    def __init__(self, attempts: int, window: float, bootstrap_sessions: int,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.bootstrap_sessions = bootstrap_sessions
        self._now = now
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._bootstrap: dict[str, int] = {}
        self._refusals: dict[str, tuple[int, float | None]] = {}  # source -> (unlogged refusals, last log)

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

    def note_refused(self, source: str) -> int | None:
        """Counts a refusal. Returns how many went unlogged when one log line is due (at most one per
        window per source, so a flood cannot fill the disk), else None."""
        now = self._now()
        count, logged_at = self._refusals.pop(source, (0, None))
        count += 1
        due = logged_at is None or now - logged_at >= self.window
        self._refusals[source] = (0, now) if due else (count, logged_at)
        if len(self._refusals) > MAX_SOURCES:
            self._refusals.pop(next(iter(self._refusals)))
        return count if due else None
