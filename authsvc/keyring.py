"""The service's signing keys and server secrets, opened from the store with the master key.

One key is active: new access tokens are signed with it. `iotauth keys rotate` (another process)
retires it and adds a new one; a retired key stays published, and verifies, until every token it
signed has expired: retired + access-token lifetime + the leeway tokens.py allows. A running server
follows with `refresh(now)`, a read of the key-set generation, which is cheap enough for every sweep.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from authsvc.config import MAX_ACCESS_TTL
from authsvc.keys import (
    Sealer,
    SealError,
    SigningKey,
    jwks_document,
    new_signing_key,
    open_signing_key,
    seal_signing_key,
)
from authsvc.store import Store
from authsvc.tokens import TIME_LEEWAY

log = logging.getLogger("iotauth.keys")

SECRET_NAMES = ("refresh_hmac", "device_code_hmac", "web_session")


@dataclass(frozen=True)
class Rotation:
    new: SigningKey
    previous: SigningKey
    published_until: float  # when the previous key drops out of the JWKS


class KeyRing:
    def __init__(self, store: Store, sealer: Sealer, access_ttl: int) -> None:
        self.store = store
        self.sealer = sealer
        self.access_ttl = access_ttl
        self.secrets = {name: self._secret(name) for name in SECRET_NAMES}
        self.version = 0  # goes up whenever the published set changes (the Gate re-publishes the JWKS then)
        self.reload()

    def _secret(self, name: str) -> bytes:
        sealed = self.store.secret(name)
        if sealed is None:
            value = secrets.token_bytes(32)
            self.store.put_secret(name, self.sealer.seal(value, f"secret:{name}"))
            return value
        return self.sealer.open(sealed, f"secret:{name}")

    def reload(self) -> None:
        """Open every stored key; until the next `refresh(now)` all of them are published."""
        self._generation = self.store.key_generation()  # read first: a rotation after it is seen next time
        rows = self.store.signing_keys()
        self._keys = [open_signing_key(self.sealer, r["kid"], r["sealed"], r["created"], r["retired"])
                      for r in rows]
        self._published = list(self._keys)
        self.version += 1

    def refresh(self, now: float) -> bool:
        """Follow a rotation made by another process and drop keys whose tokens have all expired.

        True when the published set changed. A new key set that cannot be opened is logged once, and
        the keys in use stay in use."""
        before = self.version
        generation = self.store.key_generation()
        if generation != self._generation:
            self._generation = generation
            try:
                self.reload()
            except SealError as exc:
                log.error("the signing keys changed but cannot be opened (%s); still using the previous set", exc)
        published = [k for k in self._keys if now < self.published_until(k)]
        if [k.kid for k in published] != [k.kid for k in self._published]:
            self._published = published
            self.version += 1
        return self.version != before

    def published_until(self, key: SigningKey) -> float:
        """Until when a key is in the JWKS and verifies: for ever while active."""
        if key.retired is None:
            return float("inf")
        return key.retired + self.access_ttl + TIME_LEEWAY

    def ensure_signing_key(self, now: float) -> SigningKey:
        if not self._keys:
            self.add_signing_key(now)
        return self.active

    def add_signing_key(self, now: float) -> SigningKey:
        key = new_signing_key(now)
        self.store.add_signing_key(key.kid, seal_signing_key(self.sealer, key), now)
        self.reload()
        return key

    def rotate(self, now: float) -> Rotation:
        """A new active key; the previous one retires now. Keys retired long enough ago that no
        server (whatever its configured lifetime, at most MAX_ACCESS_TTL) can still need them are deleted."""
        previous = self.active
        key = new_signing_key(now)
        self.store.drop_retired_signing_keys(now - MAX_ACCESS_TTL - TIME_LEEWAY)
        self.store.rotate_signing_key(key.kid, seal_signing_key(self.sealer, key), now)
        self.reload()
        return Rotation(new=self.active, previous=previous, published_until=now + self.access_ttl + TIME_LEEWAY)

    def all_keys(self) -> list[SigningKey]:
        """Every stored key, oldest first (published or not)."""
        return list(self._keys)

    @property
    def active(self) -> SigningKey:
        live = [k for k in self._keys if k.retired is None]
        return max(live or self._keys, key=lambda k: k.created)

    def verification_keys(self) -> dict[str, SigningKey]:
        return {k.kid: k for k in self._published}

    def jwks(self) -> dict[str, Any]:
        return jwks_document(self._published)
