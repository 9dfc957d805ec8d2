"""DPoP proofs as an MQTT device makes them (RFC 9449 section 4.2, protocol section 4).

A proof is a JWT with header ``typ`` = ``dpop+jwt``, ``alg`` = ``ES256`` and the
device's public key as ``jwk`` (public members only), and claims ``jti``,
``iat``, ``htm``, ``htu``, plus ``ath`` (RFC 9449 section 4.2: base64url of the
SHA-256 of the ASCII access token) on CONNECT and ``nonce`` whenever the device
holds a server nonce. Over MQTT, ``htm`` is ``PUBLISH`` with the request topic
as ``htu``, or ``CONNECT`` with the broker audience as ``htu``.

Also the RFC 7638 JWK thumbprint (section 3: required members only, sorted,
no whitespace, SHA-256, base64url), which the access token's ``cnf.jkt`` holds.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey
from joserfc.util import urlsafe_b64encode

ALG = "ES256"
CURVE = "P-256"
PROOF_TYP = "dpop+jwt"
HTM_PUBLISH = "PUBLISH"
HTM_CONNECT = "CONNECT"
MAX_JTI = 64

# RFC 7638 section 3.2: the required members per key type.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
    "oct": ("k", "kty"),
}
_PUBLIC_EC_MEMBERS = ("kty", "crv", "x", "y")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return urlsafe_b64encode(data).decode("ascii")


def access_token_hash(access_token: str) -> str:
    """The ``ath`` claim: base64url(SHA-256(ASCII access token)), RFC 9449 section 4.2."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256) of a public or private JWK; extra members are ignored."""
    kty = jwk.get("kty")
    if kty not in _THUMBPRINT_MEMBERS:
        raise ValueError(f"unsupported kty {kty!r}")
    required = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[kty]}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def new_jti() -> str:
    """A unique proof identifier: 192 random bits, 32 characters (at most 64 allowed)."""
    return secrets.token_urlsafe(24)


def generate_key() -> ECKey:
    """A fresh P-256 key pair for ES256."""
    return ECKey.generate_key(CURVE, private=True)


def import_private_key(jwk: Mapping[str, Any]) -> ECKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != CURVE or "d" not in jwk:
        raise ValueError("expected a private P-256 EC JWK")
    return ECKey.import_key(dict(jwk))


def private_jwk(key: ECKey) -> dict[str, str]:
    """The key as a JWK including ``d``, for sealed storage only."""
    return {name: str(value) for name, value in key.as_dict(private=True).items()}


def public_jwk(key: ECKey) -> dict[str, str]:
    """The public members only (``kty``, ``crv``, ``x``, ``y``): never ``d``."""
    members = key.as_dict(private=False)
    return {name: str(members[name]) for name in _PUBLIC_EC_MEMBERS}


def make_proof(
    key: ECKey,
    *,
    htm: str,
    htu: str,
    now: float,
    nonce: str | None = None,
    access_token: str | None = None,
    jti: str | None = None,
) -> str:
    """A compact DPoP proof JWT signed by ``key``; ``now`` (epoch seconds) gives ``iat``."""
    jti = new_jti() if jti is None else jti
    if not 0 < len(jti) <= MAX_JTI:
        raise ValueError(f"jti must be 1-{MAX_JTI} characters")
    header = {"typ": PROOF_TYP, "alg": ALG, "jwk": public_jwk(key)}
    claims: dict[str, Any] = {"jti": jti, "iat": int(now), "htm": htm, "htu": htu}
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    return jwt.encode(header, claims, key, algorithms=[ALG])


def publish_proof(key: ECKey, topic: str, *, now: float, nonce: str | None = None) -> str:
    """Proof for a request published to ``topic`` (htm PUBLISH, htu = the topic)."""
    return make_proof(key, htm=HTM_PUBLISH, htu=topic, now=now, nonce=nonce)


def connect_proof(key: ECKey, audience: str, access_token: str, *, now: float,
                  nonce: str | None = None) -> str:
    """Proof for CONNECT (htm CONNECT, htu = broker audience, ath of the token)."""
    return make_proof(key, htm=HTM_CONNECT, htu=audience, now=now, nonce=nonce,
                      access_token=access_token)
