"""Client side of the grants, as pure values and functions (no I/O, no clock).

- RFC 8628 section 3.2 (device authorization response) and 3.5 (polling:
  ``authorization_pending`` keeps the interval, ``slow_down`` adds 5 s).
- RFC 6749 section 5.1 (token response, here always ``token_type`` DPoP) and
  section 6 (when to refresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from device_sim.errors import ProtocolViolation

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"
POLL_AGAIN = ("authorization_pending", "slow_down")
SLOW_DOWN_STEP = 5.0  # RFC 8628 section 3.5
DEFAULT_INTERVAL = 5  # RFC 8628 section 3.2
REFRESH_MARGIN = 60.0  # seconds before expiry
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class DeviceAuthorization:
    """RFC 8628 section 3.2 response."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True)
class TokenSet:
    """RFC 6749 section 5.1 response of token_type DPoP, with the time it arrived."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    scope: str
    received_at: float

    @property
    def expires_at(self) -> float:
        return self.received_at + self.expires_in

    @property
    def refresh_at(self) -> float:
        return self.received_at + refresh_delay(self.expires_in)


def next_poll_interval(interval: float, error: str) -> float:
    """Seconds to wait before the next poll after an RFC 8628 section 3.5 ``error``.

    ``authorization_pending`` keeps the interval; ``slow_down`` adds 5 s to it
    for this and all later polls.
    """
    if error == "slow_down":
        return interval + SLOW_DOWN_STEP
    if error == "authorization_pending":
        return interval
    raise ValueError(f"{error!r} ends polling")


def refresh_delay(expires_in: float) -> float:
    """Seconds after issue to refresh: 60 s before expiry, or at 80 % when the lifetime is short."""
    return expires_in - min(REFRESH_MARGIN, 0.2 * expires_in)


def backoff_delay(attempt: int) -> float:
    """Wait before retry number ``attempt`` (1, 2, ...) after a transient failure."""
    return min(2.0 ** attempt, MAX_BACKOFF)


def parse_device_authorization(response: Mapping[str, Any]) -> DeviceAuthorization:
    try:
        return DeviceAuthorization(
            device_code=_required_str(response, "device_code"),
            user_code=_required_str(response, "user_code"),
            verification_uri=_required_str(response, "verification_uri"),
            verification_uri_complete=_optional_str(response, "verification_uri_complete"),
            expires_in=_positive_int(response, "expires_in"),
            interval=_positive_int(response, "interval") if "interval" in response else DEFAULT_INTERVAL,
        )
    except ValueError as exc:
        raise ProtocolViolation(f"device_authorization response: {exc}") from None


def parse_token_response(response: Mapping[str, Any], requested_scope: str, now: float) -> TokenSet:
    try:
        access_token = _required_str(response, "access_token")
        if not access_token.isascii() or " " in access_token:
            raise ValueError("access_token is not a single ASCII word")
        token_type = _required_str(response, "token_type")
        if token_type.lower() != "dpop":
            raise ValueError(f"token_type is {token_type!r}, expected DPoP")
        return TokenSet(
            access_token=access_token,
            refresh_token=_required_str(response, "refresh_token"),
            expires_in=_positive_int(response, "expires_in"),
            scope=_optional_str(response, "scope") or requested_scope,
            received_at=now,
        )
    except ValueError as exc:
        raise ProtocolViolation(f"token response: {exc}") from None


def pairing_message(error: str, description: str = "") -> str:
    messages = {
        "access_denied": "the owner denied this device on the activation page",
        "expired_token": "the user code expired before anyone approved it; run again for a new code",
    }
    text = messages.get(error, f"pairing failed: {error}")
    return f"{text} ({description})" if description and error not in messages else text


def _required_str(response: Mapping[str, Any], name: str) -> str:
    value = response.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} missing or not a string")
    return value


def _optional_str(response: Mapping[str, Any], name: str) -> str | None:
    value = response.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _positive_int(response: Mapping[str, Any], name: str) -> int:
    value = response.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} missing or not a positive integer")
    return value
