"""Compact JWS (RFC 7515 section 7.1), read once and verified with `cryptography` directly.

Used for both JWTs of a CONNECT, the access token (authsvc/tokens.py) and the DPoP proof
(authsvc/dpop.py). They used to be decoded twice, by our checks and again by joserfc's
`jws.deserialize_compact`, which also rebuilt the proof's key object on every call; decoding once and
verifying the signing input already at hand took about a third off the CONNECT check (bench 2).

Nothing that joserfc refused is accepted here. `verifies` refuses, as joserfc did:
- a header segment over 512 characters;
- a header or payload segment, or a signature, that is not strict unpadded base64url (`=`, `+`, `/`,
  any other character outside the alphabet, a length of 4n+1, unused trailing bits set); the payload
  is exempt only under RFC 7797 (`b64` false, named in `crit`), where it is not base64url at all;
- a header without `alg`, with a member outside RFC 7515's registered ones, or with a registered member
  of the wrong type (`jku`/`x5u` http(s) URLs, `jwk` an object, `x5c`/`crit` lists of strings, `b64` a
  boolean, the others strings); `crit` naming a member that is absent or not registered; `b64` other
  than true without `crit` naming it;
- `alg` other than the one the caller allows, a key of another type or curve than `alg` needs, and an
  ES256 signature that is not exactly 64 bytes (r || s, RFC 7518 section 3.4).
The callers' own checks (typ, alg allow-list, kid, claims, ...) come on top, unchanged.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from authsvc.keys import b64u_decode

MAX_HEADER_SEGMENT = 512  # characters; joserfc's JWSRegistry.max_header_length
MAX_SIGNATURE_SEGMENT = 1024  # joserfc's JWSRegistry.max_signature_length
ES256_SIGNATURE_BYTES = 64

_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_LAST_CHARACTER = {1: b"AEIMQUYcgkosw048", 2: b"AQgw"}  # by padding needed: unused bits must be zero
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def b64u_decode_strict(text: str) -> bytes:
    """Unpadded base64url exactly as joserfc reads it (`joserfc.util.urlsafe_b64decode`); ValueError for
    `+`, `/`, `=`, any other character outside the alphabet, a length of 4n+1, or unused bits set."""
    raw = text.encode("ascii")  # UnicodeEncodeError is a ValueError
    if b"+" in raw or b"/" in raw or b"=" in raw:
        raise ValueError("not unpadded base64url")
    pad = -len(raw) % 4
    if pad == 3 or (pad and raw[-1] not in _LAST_CHARACTER[pad]):
        raise ValueError("not canonical base64url")
    return binascii.a2b_base64(raw.translate(_TO_STANDARD) + b"=" * pad, strict_mode=True)


def _decode(segment: str) -> tuple[bytes, bool]:
    """The segment's bytes and whether it is strict base64url. ValueError only if even the lenient decoder
    (`keys.b64u_decode`, which our checks have always used to read header and claims) refuses it."""
    try:
        return b64u_decode_strict(segment), True
    except ValueError:
        return b64u_decode(segment), False


class CompactJWS:
    """One compact JWS, split and decoded once: `header` and `claims` as JSON values (the caller checks
    they are objects), the segments kept for the signature check."""

    __slots__ = ("header", "claims", "_segments", "_strict_header", "_strict_payload")

    def __init__(self, jws: str, *, json_payload: bool = True) -> None:
        """ValueError (including UnicodeDecodeError) or RecursionError when it is not three segments of
        base64url JSON. With `json_payload` false, the payload need only be base64url (`claims` is None)."""
        segments = jws.split(".")
        if len(segments) != 3:
            raise ValueError("not three segments")
        head, self._strict_header = _decode(segments[0])
        body, self._strict_payload = _decode(segments[1])
        self.header: Any = json.loads(head)
        self.claims: Any = json.loads(body) if json_payload else None
        self._segments = segments

    def verifies(self, public_key: Any, alg: str) -> bool:
        """True only if the JWS is one joserfc's `jws.deserialize_compact(jws, key, algorithms=[alg])`
        accepts and its signature by `public_key` (a `cryptography` public key) verifies."""
        if not _header_acceptable(self.header, alg, len(self._segments[0]), self._strict_header,
                                  self._strict_payload):
            return False
        head, body, signature_segment = self._segments
        if len(signature_segment) > MAX_SIGNATURE_SEGMENT:
            return False
        try:
            signature = b64u_decode_strict(signature_segment)
        except ValueError:
            return False
        # both ASCII: the header is strict base64url, the payload at least lenient (which needs ASCII)
        return signature_verifies(public_key, alg, f"{head}.{body}".encode("ascii"), signature)


def signature_verifies(public_key: Any, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """ES256 (P-256 only, a 64-byte r || s) or EdDSA (Ed25519 or Ed448), with `cryptography`."""
    try:
        if alg == "ES256":
            if (not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1"
                    or len(signature) != ES256_SIGNATURE_BYTES):
                return False
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            der = encode_dss_signature(r, s)
            public_key.verify(der, signing_input, _ECDSA_SHA256)
            return True
        if alg == "EdDSA":
            if not isinstance(public_key, (Ed25519PublicKey, Ed448PublicKey)):
                return False
            public_key.verify(signature, signing_input)
            return True
    except InvalidSignature:
        return False
    return False


# -- joserfc's header checks (JWSRegistry.check_header, decode_header, is_rfc7797_enabled) ---------------
def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


REGISTERED_HEADER: dict[str, Callable[[Any], bool]] = {  # RFC 7515 section 4.1, and RFC 7797's b64
    "alg": _is_str,
    "jku": _is_url,
    "jwk": lambda value: isinstance(value, dict),
    "kid": _is_str,
    "x5u": _is_url,
    "x5c": _is_str_list,
    "x5t": _is_str,
    "x5t#S256": _is_str,
    "typ": _is_str,
    "cty": _is_str,
    "crit": _is_str_list,
    "b64": lambda value: isinstance(value, bool),
}


def _header_acceptable(header: dict[str, Any], alg: str, header_chars: int, strict_header: bool,
                       strict_payload: bool) -> bool:
    if header_chars > MAX_HEADER_SEGMENT or not strict_header or "alg" not in header:
        return False
    if "b64" in header and header["b64"] is not True:  # RFC 7797: only with crit naming b64
        crit = header.get("crit")
        if not (isinstance(crit, list) and "b64" in crit):
            return False
    elif not strict_payload:
        return False
    if not header.keys() <= REGISTERED_HEADER.keys():
        return False
    if not all(valid(header[name]) for name, valid in REGISTERED_HEADER.items() if name in header):
        return False
    if "crit" in header and not all(name in header and name in REGISTERED_HEADER for name in header["crit"]):
        return False
    return header["alg"] == alg
