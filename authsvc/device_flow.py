"""RFC 8628 device authorization: codes and the polling state machine (protocol.md sections 3 and 5).

Pure functions over a `DeviceCode` row, its polling state and `now`. The code's state (pending, approved,
denied, consumed, expiry) is in the database; the polling state (last counted poll, current interval) is
in the serving process's memory (`PollMemory`), so a poll of a pending code writes nothing to disk.
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


@dataclass(frozen=True, slots=True)
class PollState:
    """A pending code's counted polls: when the last one came and the interval it must keep now."""

    last_poll: float
    interval: int
    expires: float  # the code's, so the memory can forget it without asking the database


@dataclass(frozen=True)
class PollOutcome:
    """What a counted poll decided: the error to send, and the interval the device must keep from now on."""

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


def poll(code: DeviceCode, state: PollState | None, now: float) -> PollOutcome | None:
    """Steps 4-5. Returns None when the code is approved (issue tokens), else the error to answer.

    `state` is None before the first counted poll: then the interval is the one issued with the code."""
    if now >= code.expires:
        raise ExpiredToken()
    if code.status == "denied":
        raise AccessDenied()
    if code.status == "approved":
        return None
    if state is None:
        return PollOutcome(AuthorizationPending(), code.interval)  # the first poll is never slow_down
    if now - state.last_poll < state.interval:
        interval = state.interval + SLOW_DOWN_STEP
        return PollOutcome(SlowDown(interval), interval)
    return PollOutcome(AuthorizationPending(), state.interval)


class PollMemory:
    """The polling state of pending device codes, by code hash, in the process that answers the polls.

    Kept in memory rather than written to SQLite on every poll: that commit (an fsync, on the event loop
    every session shares) was 44.6 % of the broker's busy time with 100 devices polling
    (docs/performance.md, benchmark 1). Only `iotauth serve` answers polls, so no other process needs it.

    After a restart (or once a code's entry was evicted, below) the memory is empty: the next poll of a
    code is not flagged and its interval is the issued one again. That costs a device at most one early
    poll answered `authorization_pending`, never a wrong decision: approval, denial and expiry are read
    from the database on every poll.

    Bounded: an entry exists only for a pending, unexpired code that passed the lookup (a registered
    client's, at most service.MAX_PENDING_CODES per client), is dropped when a poll finds the code
    approved, denied or expired, and `sweep` drops the expired ones left behind (codes decided elsewhere
    and never polled again, clients removed). Past `capacity` the least recently polled entry goes first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._states: dict[str, PollState] = {}  # in order of the last counted poll, oldest first

    def __len__(self) -> int:
        return len(self._states)

    def get(self, code_hash: str) -> PollState | None:
        return self._states.get(code_hash)

    def poll(self, code: DeviceCode, now: float) -> PollOutcome | None:
        """Steps 4-5 for a code that passed the lookup (`check_binding`), with its counted poll remembered."""
        try:
            outcome = poll(code, self._states.get(code.code_hash), now)
        except (ExpiredToken, AccessDenied):
            self.forget(code.code_hash)
            raise
        if outcome is None:  # approved: redeemed now, never polled again
            self.forget(code.code_hash)
        else:
            self._states.pop(code.code_hash, None)  # re-inserted last: the dict's order is the eviction order
            self._states[code.code_hash] = PollState(now, outcome.interval, code.expires)
            if len(self._states) > self.capacity:
                del self._states[next(iter(self._states))]
        return outcome

    def forget(self, code_hash: str) -> None:
        self._states.pop(code_hash, None)

    def sweep(self, now: float) -> int:
        """Drop the states of expired codes; returns how many."""
        expired = [h for h, s in self._states.items() if now >= s.expires]
        for code_hash in expired:
            del self._states[code_hash]
        return len(expired)
