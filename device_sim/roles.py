"""What a paired device does with its scopes (config/default.toml's catalogue).

- ``write:temperature``: publish ``{"celsius": 21.4, "ts": ...}`` to
  ``home/<client_id>/temperature``.
- ``device:power``: obey ``home/<client_id>/power/set`` (``on``/``off`` or
  ``{"power": "on"}``) and report ``{"power": "on", "ts": ...}`` on
  ``home/<client_id>/power/state``.
- ``read:temperature``: receive ``home/+/temperature``.
- ``control:power``: (on request) publish ``{"power": "on"}`` to
  ``home/<other client_id>/power/set``.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

WRITE_TEMPERATURE = "write:temperature"
READ_TEMPERATURE = "read:temperature"
DEVICE_POWER = "device:power"
ALL_TEMPERATURES = "home/+/temperature"

# Protocol section 1: identities are substituted into topics, so nothing else gets in.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_client_id(client_id: str) -> None:
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ValueError(f"client_id {client_id!r}: 1-64 characters of [A-Za-z0-9._-]")


def temperature_topic(client_id: str) -> str:
    return f"home/{client_id}/temperature"


def power_set_topic(client_id: str) -> str:
    return f"home/{client_id}/power/set"


def power_state_topic(client_id: str) -> str:
    return f"home/{client_id}/power/state"


def parse_power_command(payload: bytes) -> str | None:
    """``on``/``off`` from ``on``, ``OFF`` or ``{"power": "on"}``; None for anything else."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            value = json.loads(text).get("power")
        except (ValueError, AttributeError):
            return None
        text = value if isinstance(value, str) else ""
    text = text.strip().lower()
    return text if text in ("on", "off") else None


def decode_payload(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload.decode("utf-8", errors="replace")


class Thermometer:
    """A plausible room temperature: a small random walk between 18 and 26 degrees C."""

    def __init__(self, rng: random.Random | None = None, start: float | None = None) -> None:
        self._rng = rng or random.Random()
        self._value = 21.0 + self._rng.uniform(-1.0, 1.0) if start is None else start

    def read(self) -> float:
        self._value = min(26.0, max(18.0, self._value + self._rng.uniform(-0.2, 0.2)))
        return round(self._value, 1)
