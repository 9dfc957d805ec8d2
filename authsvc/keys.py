"""Secrets at rest: AES-GCM sealing under the master key, ES256 signing keys and the JWKS (RFC 7517).

Nothing secret is written in plaintext: signing keys and server secrets are
sealed with a 256-bit master key (where it comes from: authsvc/masterkey.py).
A key set holds one active key and, for as long as tokens they signed may still
be valid, the retired ones (authsvc/keyring.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import ECKey

SIGNING_ALG = "ES256"


class SealError(ValueError):
    """No usable master key, or a sealed value could not be opened (wrong master key or tampered data)."""


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """AES-256-GCM with a purpose label as associated data, so a sealed value cannot be moved to another use."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, purpose: str) -> str:
        nonce = secrets.token_bytes(12)
        return b64u(nonce + self._aead.encrypt(nonce, plaintext, purpose.encode()))

    def open(self, sealed: str, purpose: str) -> bytes:
        try:
            raw = b64u_decode(sealed)
            return self._aead.decrypt(raw[:12], raw[12:], purpose.encode())
        except (InvalidTag, ValueError) as exc:
            raise SealError(f"cannot open sealed {purpose}: wrong master key or tampered data") from exc


def keyed_hash(secret: bytes, value: str, purpose: str) -> str:
    """HMAC-SHA256 used to store refresh tokens and device codes: a copied database yields no usable token."""
    return b64u(hmac.new(secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: ECKey
    created: float
    retired: float | None

    def public_jwk(self) -> dict[str, Any]:
        jwk = self.key.as_dict(private=False)
        jwk.update({"kid": self.kid, "alg": SIGNING_ALG, "use": "sig"})
        return jwk


def new_signing_key(now: float) -> SigningKey:
    key = ECKey.generate_key("P-256", private=True)
    return SigningKey(kid=key.thumbprint(), key=key, created=now, retired=None)


def seal_signing_key(sealer: Sealer, key: SigningKey) -> str:
    return sealer.seal(json.dumps(key.key.as_dict(private=True)).encode(), f"signing-key:{key.kid}")


def open_signing_key(sealer: Sealer, kid: str, sealed: str, created: float, retired: float | None) -> SigningKey:
    jwk = json.loads(sealer.open(sealed, f"signing-key:{kid}"))
    return SigningKey(kid=kid, key=ECKey.import_key(jwk), created=created, retired=retired)


def jwks_document(keys: list[SigningKey]) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}
