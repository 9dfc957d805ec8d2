"""The service's signing keys and server secrets, opened from the store with the master key."""

from __future__ import annotations

import secrets

from authsvc.keys import (
    Sealer,
    SigningKey,
    jwks_document,
    new_signing_key,
    open_signing_key,
    seal_signing_key,
)
from authsvc.store import Store

SECRET_NAMES = ("refresh_hmac", "device_code_hmac", "web_session")


class KeyRing:
    def __init__(self, store: Store, sealer: Sealer, access_ttl: int) -> None:
        self.store = store
        self.sealer = sealer
        self.access_ttl = access_ttl
        self.secrets = {name: self._secret(name) for name in SECRET_NAMES}
        self.reload()

    def _secret(self, name: str) -> bytes:
        sealed = self.store.secret(name)
        if sealed is None:
            value = secrets.token_bytes(32)
            self.store.put_secret(name, self.sealer.seal(value, f"secret:{name}"))
            return value
        return self.sealer.open(sealed, f"secret:{name}")

    def reload(self) -> None:
        rows = self.store.signing_keys()
        self._keys = [open_signing_key(self.sealer, r["kid"], r["sealed"], r["created"], r["retired"]) for r in rows]

    def ensure_signing_key(self, now: float) -> SigningKey:
        if not self._keys:
            self.add_signing_key(now)
        return self.active

    def add_signing_key(self, now: float) -> SigningKey:
        key = new_signing_key(now)
        self.store.add_signing_key(key.kid, seal_signing_key(self.sealer, key), now)
        self.reload()
        return key

    @property
    def active(self) -> SigningKey:
        return max(self._keys, key=lambda k: k.created)

    def verification_keys(self) -> dict[str, SigningKey]:
        return {k.kid: k for k in self._keys}

    def jwks(self) -> dict:
        return jwks_document(self._keys)
