"""What a :class:`~device_sim.device.Device` reports to its ``on_event`` observer.

Event names and their ``data`` (never tokens, keys or device codes):

- ``key_ready``: ``jkt`` (RFC 7638 thumbprint of the device key), ``created`` (bool)
- ``code_shown``: ``user_code``, ``verification_uri``, ``verification_uri_complete``
  (str or None), ``expires_in``, ``interval``
- ``polled``: ``error`` (``authorization_pending`` or ``slow_down``), ``interval``
  (seconds until the next poll)
- ``tokens_received``: ``grant_type`` (the device-code URN or ``refresh_token``),
  ``scope``, ``expires_in``
- ``connected``: ``client_id``, ``host``, ``port``, ``scope``
- ``subscribed``: ``topic``, ``qos``
- ``published``: ``topic``, ``payload`` (the JSON object sent)
- ``received``: ``topic``, ``payload`` (parsed JSON, else text)
- ``power``: ``state`` (``on``/``off``)
- ``refused``: ``what`` (``connect`` or ``subscribe``), ``code`` (CONNACK return
  code, or 0x80 for SUBACK), ``reason`` (``not authorized`` ...), ``topic`` (subscribe)
- ``disconnected``: ``reason`` (``lost``, ``refresh``, ``grant_lost``, ``once``,
  ``stopped``, ``reconnect``, ``requested``), ``detail`` (with ``lost``)
- ``grant_lost``: ``error`` (``invalid_grant`` or ``scope_changed``), ``description``
- ``error``: ``message``, ``retry_in`` (a transient failure; the device retries)
- ``stopped``: ``error`` (str, or None after a clean stop)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KEY_READY = "key_ready"
CODE_SHOWN = "code_shown"
POLLED = "polled"
TOKENS_RECEIVED = "tokens_received"
CONNECTED = "connected"
SUBSCRIBED = "subscribed"
PUBLISHED = "published"
RECEIVED = "received"
POWER = "power"
REFUSED = "refused"
DISCONNECTED = "disconnected"
GRANT_LOST = "grant_lost"
ERROR = "error"
STOPPED = "stopped"


@dataclass(frozen=True)
class DeviceEvent:
    """Something the device did or saw; ``data`` never holds tokens or keys."""

    name: str
    data: dict[str, Any]


class EventRecorder:
    """An ``on_event`` callback that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: DeviceEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [e.name for e in self.events]

    def wait_for(self, name: str, timeout: float = 10.0, *, after: int = 0,
                 where: Callable[[dict[str, Any]], bool] | None = None) -> DeviceEvent:
        """The first event ``name`` at index >= ``after`` (matching ``where``); TimeoutError if none."""
        def find() -> DeviceEvent | None:
            for event in self.events[after:]:
                if event.name == name and (where is None or where(event.data)):
                    return event
            return None
        with self._cond:
            found = self._cond.wait_for(find, timeout)
        if found is None:
            raise TimeoutError(f"no {name!r} event within {timeout:g} s; saw {self.names()}")
        return found
