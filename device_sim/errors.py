"""Errors of the simulated device, each with a message fit for one terminal line.

The CLI catches :class:`DeviceSimError` once and prints it; library users can
catch the narrower classes. Service errors keep the wire ``error`` code
(RFC 6749 section 5.2, RFC 8628 section 3.5, RFC 9449) so callers branch on it.
"""

from __future__ import annotations

from typing import Any


class DeviceSimError(Exception):
    """Base class: anything the device reports as a failure."""


class StateError(DeviceSimError):
    """The sealed state file or its key cannot be used (message names the file)."""


class RequestTimeout(DeviceSimError):
    """No response arrived on the reply topic in time."""


class ServiceError(DeviceSimError):
    """The service answered with an OAuth error response (protocol section 3)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.error = str(response.get("error", ""))
        self.description = str(response.get("error_description", ""))
        super().__init__(f"{self.error}: {self.description}" if self.description else self.error)


class ServiceBusy(ServiceError):
    """`temporarily_unavailable` or `server_error`: the service may answer later; retry after a pause."""

    ERRORS = frozenset({"temporarily_unavailable", "server_error"})


class ProtocolViolation(DeviceSimError):
    """A response that does not have the shape protocol section 3 promises."""


class ConnectRefused(DeviceSimError):
    """The broker answered CONNECT with a non-zero CONNACK return code."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"broker refused CONNECT: {reason} (CONNACK {code})")


class PairingError(DeviceSimError):
    """The device flow ended without tokens (denied, expired, or refused)."""

    def __init__(self, error: str, message: str) -> None:
        self.error = error
        super().__init__(message)


class DeviceStopped(DeviceSimError):
    """stop() was called while the device was waiting."""
