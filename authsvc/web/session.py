"""Web sessions: a signed cookie naming the signed-in account and holding the CSRF token of its forms.

The cookie value is base64url(JSON) "." base64url(HMAC-SHA256), keyed with the
keyring's `web_session` secret; the payload carries its own expiry, checked
against the injected `now`. Every visitor gets a session (the sign-in form needs
a CSRF token too); signing in replaces it with a new one (new id, new token), so
a session planted before sign-in is worth nothing after. Signing out remembers
the ended id until the session would have expired anyway, so a copied cookie
stops working at once. Pure: no clock, no Starlette.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, replace

COOKIE_NAME = "iotauth_session"
SESSION_TTL = 8 * 3600
MAX_COOKIE_CHARS = 1024
_PURPOSE = b"iotauth web session v1\x00"


@dataclass(frozen=True)
class Session:
    sid: str
    user: str | None
    csrf: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def csrf_ok(session: Session, token: str | None) -> bool:
    if not token:
        return False
    return hmac.compare_digest(session.csrf.encode(), token.encode("utf-8", "replace"))


class Sessions:
    def __init__(self, secret: bytes, ttl: int = SESSION_TTL) -> None:
        if len(secret) < 32:
            raise ValueError("the session secret must be at least 32 bytes")
        self._secret = secret
        self.ttl = ttl
        self._ended: dict[str, float] = {}  # sid -> when it would have expired

    def new(self, now: float, user: str | None = None) -> Session:
        return Session(secrets.token_urlsafe(18), user, secrets.token_urlsafe(32), now + self.ttl)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, _PURPOSE + payload.encode(), hashlib.sha256).digest())

    def encode(self, session: Session) -> str:
        body = json.dumps({"sid": session.sid, "user": session.user, "csrf": session.csrf,
                           "exp": session.expires}, separators=(",", ":"))
        payload = _b64(body.encode())
        return f"{payload}.{self._mac(payload)}"

    def decode(self, value: str | None, now: float) -> Session | None:
        """The session in a cookie value, or None when it is missing, forged, expired or signed out."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        payload, _, mac = value.partition(".")
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), self._mac(payload).encode()):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(data["sid"], data["user"], data["csrf"], data["exp"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if not (isinstance(session.sid, str) and isinstance(session.csrf, str)
                and isinstance(session.user, (str, type(None))) and isinstance(session.expires, (int, float))):
            return None
        if now >= session.expires or session.sid in self._ended:
            return None
        return replace(session, expires=float(session.expires))

    def end(self, session: Session, now: float) -> None:
        """Sign out: the session's cookie is refused from now on, wherever it was copied to."""
        for sid in [s for s, expires in self._ended.items() if expires <= now]:
            del self._ended[sid]
        if session.expires > now:
            self._ended[session.sid] = session.expires
