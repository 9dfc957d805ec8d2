"""RFC 8628 device authorization: codes and the polling state machine (protocol.md sections 3 and 5).

Pure functions over a `DeviceCode` row and `now`; the store persists what they decide.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from authsvc.errors import AccessDenied, AuthorizationPending, ExpiredToken, InvalidGrant, SlowDown
from authsvc.store import DeviceCode

DEVICE_CODE_CHARS = 64
SLOW_DOWN_STEP = 5
# no look-alikes: no I, O (vs 1, 0), no 0, 1; letters then digits, shown as ABC123
USER_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
USER_CODE_DIGITS = "23456789"
_DEVICE_CODE_ALPHABET = string.ascii_letters + string.digits


def new_device_code() -> str:
    return "".join(secrets.choice(_DEVICE_CODE_ALPHABET) for _ in range(DEVICE_CODE_CHARS))


def new_user_code() -> str:
    return "".join(secrets.choice(USER_CODE_LETTERS) for _ in range(3)) + "".join(
        secrets.choice(USER_CODE_DIGITS) for _ in range(3))


def normalize_user_code(entered: str) -> str | None:
    """Entry ignores case, spaces and dashes; anything else that is not exactly a user code finds nothing.

    Issued codes avoid look-alikes, but entry accepts any three letters and three digits, so a code
    like ABC123 written by hand (or by another issuer's tests) is still found by exact match."""
    if not entered.isascii():  # before upper(): "\ufb00" and "\u017f" would fold to ASCII letters
        return None
    code = "".join(ch for ch in entered if ch not in " -\t").upper()
    if len(code) == 6 and code[:3].isalpha() and code[3:].isdigit():
        return code
    return None


@dataclass(frozen=True)
class PollOutcome:
    """What a counted poll decided: the error to send, and the interval to store."""

    error: Exception
    interval: int


def check_binding(code: DeviceCode | None, client_id: str, jkt: str) -> DeviceCode:
    """Step 3 of the order of checks: never counts as a poll, never changes the code."""
    if code is None or code.status == "consumed":
        raise InvalidGrant("Unknown or already used device_code", detail="device code unknown or consumed")
    if code.client_id != client_id:
        raise InvalidGrant(detail=f"device code belongs to {code.client_id}, presented by {client_id}")
    if code.jkt is not None and code.jkt != jkt:
        raise InvalidGrant("The DPoP key is not the one the device code was bound to")
    return code


def poll(code: DeviceCode, now: float) -> PollOutcome | None:
    """Steps 4-5. Returns None when the code is approved (issue tokens), else the error to answer."""
    if now >= code.expires:
        raise ExpiredToken()
    if code.status == "denied":
        raise AccessDenied()
    if code.status == "approved":
        return None
    if code.last_poll is not None and now - code.last_poll < code.interval:
        interval = code.interval + SLOW_DOWN_STEP
        return PollOutcome(SlowDown(interval), interval)
    return PollOutcome(AuthorizationPending(), code.interval)
