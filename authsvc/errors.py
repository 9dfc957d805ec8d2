"""OAuth errors as classes, one per wire code (RFC 6749 5.2, RFC 8628 3.5, RFC 9449 7/8, RFC 7009 2.2.1).

The core raises these; each transport renders them in exactly one place
(`mqtt_api.render_error`, the HTTP handlers). `description` goes on the wire;
`detail` goes only to the log, so nothing internal reaches a device.
"""

from __future__ import annotations


class OAuthError(Exception):
    error: str = "server_error"
    description: str = "The server could not handle the request"

    def __init__(self, description: str | None = None, *, detail: str | None = None) -> None:
        self.description = description or type(self).description
        self.detail = detail or self.description
        super().__init__(f"{self.error}: {self.detail}")

    def to_wire(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class InvalidRequest(OAuthError):
    error = "invalid_request"
    description = "The request is missing a parameter or has a malformed one"


class InvalidClient(OAuthError):
    error = "invalid_client"
    description = "Unknown client"


class InvalidGrant(OAuthError):
    error = "invalid_grant"
    description = "The grant is invalid, expired, revoked or was issued to another client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"
    description = "Unsupported grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"
    description = "The requested scope is invalid or exceeds what the client may ask for"


class AuthorizationPending(OAuthError):
    error = "authorization_pending"
    description = "The user has not yet approved the request"


class SlowDown(OAuthError):
    error = "slow_down"
    description = "Polling too fast: the interval has grown by 5 seconds"

    def __init__(self, interval: int) -> None:
        super().__init__(f"Polling too fast: wait at least {interval} s between polls")
        self.interval = interval


class AccessDenied(OAuthError):
    error = "access_denied"
    description = "The user denied the request"


class ExpiredToken(OAuthError):
    error = "expired_token"
    description = "The device code has expired"


class InvalidDPoPProof(OAuthError):
    error = "invalid_dpop_proof"
    description = "The DPoP proof is invalid"


class UseDPoPNonce(OAuthError):
    error = "use_dpop_nonce"
    description = "Use the server-provided DPoP nonce in the proof"


class ServerError(OAuthError):
    error = "server_error"
    description = "The server could not handle the request"


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    description = "The server is busy; try again shortly"


class ActivationError(Exception):
    """A user code cannot be acted on at /activate or by `iotauth approve`; `message` is for the person."""

    status = 400
    message = "That code cannot be used"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or type(self).message
        super().__init__(self.message)


class UnknownUserCode(ActivationError):
    status = 404
    message = "No pending request has that code. Check the code shown on the device."


class ExpiredUserCode(ActivationError):
    status = 410
    message = "That code has expired. Restart pairing on the device to get a new one."


class UsedUserCode(ActivationError):
    status = 409
    message = "That code was already used: the request has been approved or denied."


class TooManyAttempts(ActivationError):
    status = 429
    message = "Too many wrong codes. Wait a minute, then try again."


class RegistrationError(ValueError):
    """A client or account cannot be registered; the message is one line for the user."""
