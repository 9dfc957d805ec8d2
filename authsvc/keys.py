"""Secrets at rest: the master key, AES-GCM sealing, ES256 signing keys and the JWKS (RFC 7517).

Nothing secret is written in plaintext: signing keys and server secrets are
sealed with a 256-bit master key taken from `IOTAUTH_MASTER_KEY` (base64url),
else from a 0600 key file beside the data dir.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import ECKey

MASTER_KEY_ENV = "IOTAUTH_MASTER_KEY"
SIGNING_ALG = "ES256"


class SealError(ValueError):
    """A sealed value could not be opened: wrong master key or tampered data."""


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def master_key_file(data_dir: Path) -> Path:
    return data_dir.parent / f"{data_dir.name}.masterkey"


def load_master_key(data_dir: Path, *, create: bool = False) -> tuple[bytes, str]:
    """Return (key, where it came from). Creates the key file only when asked (at `init`)."""
    env = os.environ.get(MASTER_KEY_ENV)
    if env:
        try:
            key = b64u_decode(env.strip())
        except (ValueError, TypeError):
            key = b""
        if len(key) != 32:
            raise SealError(f"{MASTER_KEY_ENV} must be 32 bytes encoded as base64url (43 characters)")
        return key, f"the {MASTER_KEY_ENV} environment variable"
    path = master_key_file(data_dir)
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise SealError(f"{path}: the master key file is readable by other users; run `chmod 600 {path}`")
        try:
            key = b64u_decode(path.read_text(encoding="ascii").strip())
        except (ValueError, OSError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            key = b""
        if len(key) != 32:
            raise SealError(f"{path}: not a 32-byte base64url master key")
        return key, f"the key file {path}"
    if not create:
        raise SealError(f"no master key: set {MASTER_KEY_ENV} or run `iotauth init` (expected {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(b64u(key) + "\n")
    return key, f"the key file {path} (mode 0600)"


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
