"""At most one log line per kind of event and window, with a count of the lines left out.

A flood (thousands of refused requests a second) must not fill the disk of a Raspberry Pi, while the
first line of each kind still says what is happening."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_KINDS = 1_000


class QuietLog:
    def __init__(self, window: float = 10.0, now: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._now = now
        self._kinds: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # kind -> (last line, left out)

    def due(self, kind: Hashable) -> int | None:
        """None: leave this line out. Else log it, noting the returned number of lines left out before it."""
        now = self._now()
        last, left_out = self._kinds.pop(kind, (None, 0))
        if last is not None and now - last < self.window:
            self._kinds[kind] = (last, left_out + 1)
            return None
        self._kinds[kind] = (now, 0)
        if len(self._kinds) > MAX_KINDS:
            self._kinds.popitem(last=False)
        return left_out
