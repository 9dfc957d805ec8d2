"""Access tokens: RFC 9068 JWT profile, issued and verified with the service's own keys only.

Verification follows RFC 8725: the algorithm comes from our allow-list, never
from the token; the key is looked up by `kid` among our keys (`jku`, `x5u` and
embedded `jwk` are ignored); `crit` is refused; `typ` must be at+jwt; time
claims must be JSON numbers.
"""

from __future__ import annotations

import json
import math
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from joserfc import jws
from joserfc.jwk import ECKey

from authsvc.jws_compact import CompactJWS
from authsvc.keys import SIGNING_ALG, SigningKey

ACCEPTED_TYP = ("at+jwt", "application/at+jwt")
TIME_LEEWAY = 60
MAX_TOKEN_CHARS = 8192


class TokenError(ValueError):
    """An access token was refused; the message is for the log."""


@dataclass(frozen=True)
class AccessClaims:
    iss: str
    sub: str
    aud: str | list[str]
    exp: float
    iat: float
    jti: str
    client_id: str
    scope: str
    jkt: str | None
    x5t: str | None

    @property
    def scopes(self) -> list[str]:
        return self.scope.split()


def issue_access_token(key: SigningKey, *, issuer: str, audience: str, sub: str, client_id: str, scope: str,
                       jkt: str, now: float, ttl: int) -> tuple[str, dict[str, Any]]:
    iat = int(now)
    claims = {"iss": issuer, "sub": sub, "aud": audience, "exp": iat + ttl, "iat": iat,
              "jti": secrets.token_urlsafe(16), "client_id": client_id, "scope": scope, "cnf": {"jkt": jkt}}
    header = {"typ": "at+jwt", "alg": SIGNING_ALG, "kid": key.kid}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    token = jws.serialize_compact(header, payload, key.key, algorithms=[SIGNING_ALG])
    return token, claims


def _parse(token: Any) -> CompactJWS:
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("not a compact JWS")
    try:
        parsed = CompactJWS(token)  # decoded once; the signature check reuses it
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested JSON
        raise TokenError("not well-formed") from None
    if not isinstance(parsed.header, dict) or not isinstance(parsed.claims, dict):
        raise TokenError("not well-formed")
    return parsed


def _parts(token: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    parsed = _parse(token)
    return parsed.header, parsed.claims


def check_header(header: dict[str, Any], keys: dict[str, SigningKey]) -> SigningKey:
    if header.get("typ") not in ACCEPTED_TYP:
        raise TokenError(f"typ {header.get('typ')!r} is not at+jwt")
    if header.get("alg") != SIGNING_ALG:
        raise TokenError(f"alg {header.get('alg')!r} is not allowed")
    if "crit" in header:
        raise TokenError("crit header present")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError("kid is not one of the service's keys")
    return keys[kid]


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float, e.g. 10**400
        return False


def _number(claims: dict[str, Any], name: str, required: bool = True) -> float | None:
    value = claims.get(name)
    if value is None and not required and name not in claims:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise TokenError(f"{name} must be a JSON number")
    return float(value)


def check_audience(aud: Any, audience: str) -> None:
    """RFC 7519 4.1.3: a string, or an array of strings; one of them must be the broker audience, exactly."""
    if aud == audience:
        return
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud) and audience in aud:
        return
    raise TokenError("aud does not name the broker")


def check_claims(claims: dict[str, Any], *, issuer: str, audience: str, now: float) -> AccessClaims:
    if claims.get("iss") != issuer:
        raise TokenError("iss does not match")
    aud = claims.get("aud")
    check_audience(aud, audience)
    exp = _number(claims, "exp")
    iat = _number(claims, "iat")
    nbf = _number(claims, "nbf", required=False)
    assert exp is not None and iat is not None
    if exp <= now:
        raise TokenError("expired")
    if iat > now + TIME_LEEWAY or (nbf is not None and nbf > now + TIME_LEEWAY):
        raise TokenError("issued in the future")
    for name in ("sub", "jti", "client_id", "scope"):
        if not isinstance(claims.get(name), str):
            raise TokenError(f"{name} must be a string")
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict):
        raise TokenError("cnf missing: the token is not sender-constrained")
    jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
    if not (isinstance(jkt, str) or isinstance(x5t, str)):
        raise TokenError("cnf has neither jkt nor x5t#S256")
    return AccessClaims(iss=claims["iss"], sub=claims["sub"], aud=aud, exp=exp, iat=iat, jti=claims["jti"],
                        client_id=claims["client_id"], scope=claims["scope"],
                        jkt=jkt if isinstance(jkt, str) else None, x5t=x5t if isinstance(x5t, str) else None)


# kid -> (the key it was made from, its public key); a reloaded key ring brings new key objects, rebuilt once
_verification_keys: dict[str, tuple[weakref.ref[ECKey], EllipticCurvePublicKey]] = {}
MAX_CACHED_SIGNING_KEYS = 64  # a key set holds one active key and the few retired ones still valid


def _verification_key(key: SigningKey) -> EllipticCurvePublicKey:
    cached = _verification_keys.get(key.kid)
    if cached is not None and cached[0]() is key.key:
        return cached[1]
    public = key.key.public_key
    if len(_verification_keys) >= MAX_CACHED_SIGNING_KEYS:
        _verification_keys.clear()
    _verification_keys[key.kid] = (weakref.ref(key.key), public)
    return public


def verify_access_token(token: Any, keys: dict[str, SigningKey], *, issuer: str, audience: str,
                        now: float) -> AccessClaims:
    parsed = _parse(token)  # header and claims decoded once, for the checks and the signature alike
    key = check_header(parsed.header, keys)
    if not parsed.verifies(_verification_key(key), SIGNING_ALG):
        raise TokenError("signature does not verify")
    return check_claims(parsed.claims, issuer=issuer, audience=audience, now=now)
