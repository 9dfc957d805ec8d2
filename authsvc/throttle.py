"""Lock-out after repeated failures from one source (cases.md F1): wrong user codes and wrong passwords.

`max_failures` failures within `window` seconds lock the source out for `window`
seconds; while locked, every attempt is refused before it is looked at, even a
right one, and refused attempts do not count. Pure: the caller passes `now`.
Memory is bounded: at most `max_sources` sources are remembered, each with at
most `max_failures` timestamps; when full, sources with nothing left to
remember go first, then the least recently seen.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from authsvc.errors import TooManyAttempts

MAX_SOURCES = 4096


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = float("-inf")


class Throttle:
    def __init__(self, max_failures: int, window: float, *, max_sources: int = MAX_SOURCES,
                 message: str | None = None) -> None:
        if max_failures < 1 or window <= 0 or max_sources < 1:
            raise ValueError("max_failures, window and max_sources must be positive")
        self.max_failures = max_failures
        self.window = window
        self.max_sources = max_sources
        self.message = message
        self._sources: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def locked(self, source: str, now: float) -> bool:
        record = self._sources.get(source)
        return record is not None and now < record.locked_until

    def check(self, source: str, now: float) -> None:
        """Raise TooManyAttempts while `source` is locked out."""
        if self.locked(source, now):
            raise TooManyAttempts(self.message)

    def failure(self, source: str, now: float) -> None:
        record = self._sources.pop(source, None) or _Record(deque(maxlen=self.max_failures))
        self._sources[source] = record  # most recently seen last
        if now < record.locked_until:
            return
        while record.failures and record.failures[0] <= now - self.window:
            record.failures.popleft()
        record.failures.append(now)
        if len(record.failures) >= self.max_failures:
            record.locked_until = now + self.window
            record.failures.clear()
        self._bound(now)

    def success(self, source: str) -> None:
        """Forget the source's failures (call only after `check` passed, so a lock-out is never lifted early)."""
        self._sources.pop(source, None)

    def _forgettable(self, record: _Record, now: float) -> bool:
        return now >= record.locked_until and all(t <= now - self.window for t in record.failures)

    def _bound(self, now: float) -> None:
        if len(self._sources) <= self.max_sources:
            return
        for source in [s for s, r in self._sources.items() if self._forgettable(r, now)]:
            del self._sources[source]
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
