"""One decode per JWT, signatures checked with `cryptography` (authsvc/jws_compact.py): the refusals it owns.

The access token and the DPoP proof of a CONNECT are decoded once and their signatures verified
directly; what joserfc's `deserialize_compact` refused before is refused the same way (same error, same
message). Each case here builds the defect by hand, signs what it sends (so only the defect can be the
reason), and asserts the exact refusal.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from joserfc.jwk import ECKey, OKPKey

import authsvc.dpop
from authsvc.dpop import DPoPVerifier, NonceIssuer, check_public_jwk
from authsvc.errors import InvalidDPoPProof
from authsvc.jws_compact import b64u_decode_strict
from authsvc.keys import SigningKey, new_signing_key
from authsvc.tokens import TokenError, verify_access_token

NOW = 1_800_000_000.0
TOPIC = "oauth/v1/token"
KEY = ECKey.generate_key("P-256", private=True)
OTHER = ECKey.generate_key("P-256", private=True)
ED = OKPKey.generate_key("Ed25519", private=True)
SIGNATURE = "The DPoP proof signature does not verify"
NOT_A_KEY = "The DPoP proof jwk is not a valid public key"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64u(json.dumps(value).encode())


def raw_es256(key: ECKey, signing_input: str) -> bytes:
    r, s = decode_dss_signature(key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_eddsa(key: OKPKey, signing_input: str) -> bytes:
    return key.private_key.sign(signing_input.encode())


def x_of(key: ECKey) -> bytes:
    return key.public_key.public_numbers().x.to_bytes(32, "big")


def y_of(key: ECKey) -> bytes:
    return key.public_key.public_numbers().y.to_bytes(32, "big")


def proof(*, key: Any = KEY, alg: str = "ES256", header: dict[str, Any] | None = None,
          jwk: dict[str, Any] | None = None, segments: Callable[[str, str], tuple[str, str]] | None = None,
          signature: Callable[[bytes], str] = b64u) -> str:
    """A proof built by hand and signed over exactly what is sent; the defaults make a valid one."""
    h: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    if jwk is not None:
        h["jwk"] = jwk
    h |= header or {}
    c = {"jti": uuid.uuid4().hex, "iat": int(NOW), "htm": "PUBLISH", "htu": TOPIC}
    head, body = b64json(h), b64json(c)
    if segments is not None:
        head, body = segments(head, body)
    signing_input = f"{head}.{body}"
    raw = raw_es256(key, signing_input) if alg == "ES256" else raw_eddsa(key, signing_input)
    return f"{signing_input}.{signature(raw)}"


def verifier() -> DPoPVerifier:
    return DPoPVerifier(NonceIssuer(b"k" * 32, 300), algorithms=("ES256", "EdDSA"), window=60)


def refusal(proof_text: str) -> str:
    """'accepted', or the exact description of the refusal."""
    try:
        verifier().verify(proof_text, htm="PUBLISH", htu=TOPIC, now=NOW)
    except InvalidDPoPProof as exc:
        return exc.description
    return "accepted"


def non_canonical(segment: str) -> str:
    """The same bytes for a lenient decoder, but unused trailing bits set: strict base64url refuses it."""
    assert len(segment) % 4 in (2, 3), "needs a segment with unused bits"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) + 1]


def decoded(segment: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def with_unused_bits(segment: str) -> str:
    """The same JSON object, re-encoded with a filler member so that its segment has unused trailing bits
    (4n+2 or 4n+3 characters), where padding and non-canonical last characters can appear."""
    for n in range(4):
        out = b64json(decoded(segment) | {"cty": "c" * n})
        if len(out) % 4 in (2, 3):
            return out
    raise AssertionError("unreachable")


def of_length(segment: str, n: int) -> str:
    """The same JSON object, re-encoded with a filler `cty` so that its segment is exactly n characters."""
    for fill in range(n):
        out = b64json(decoded(segment) | {"cty": "c" * fill})
        if len(out) == n:
            return out
    raise AssertionError(f"no segment of {n} characters")


def padding(segment: str) -> str:
    return segment + "=" * (-len(segment) % 4)


def der(raw: bytes) -> str:
    return b64u(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")))


# -- DPoP proofs ----------------------------------------------------------------------------------------

PROOF_CASES: list[Any] = [
    ("valid ES256", lambda: proof(), "accepted"),
    ("valid EdDSA", lambda: proof(key=ED, alg="EdDSA"), "accepted"),
    # the signature: exactly 64 bytes r || s, strict base64url
    ("ES256 signature of 63 bytes", lambda: proof(signature=lambda r: b64u(r[:63])), SIGNATURE),
    ("ES256 signature of 65 bytes", lambda: proof(signature=lambda r: b64u(r + b"\0")), SIGNATURE),
    ("ES256 signature with a leading zero byte", lambda: proof(signature=lambda r: b64u(b"\0" + r)),
     SIGNATURE),
    ("ES256 signature DER-encoded", lambda: proof(signature=der), SIGNATURE),
    ("ES256 signature empty", lambda: proof(signature=lambda r: ""), SIGNATURE),
    ("ES256 signature all zero", lambda: proof(signature=lambda r: b64u(bytes(64))), SIGNATURE),
    ("ES256 signature with = padding", lambda: proof(signature=lambda r: b64u(r) + "=="), SIGNATURE),
    ("ES256 signature in standard base64", lambda: proof(
        signature=lambda r: base64.b64encode(r).decode().rstrip("=")), SIGNATURE),
    ("ES256 signature with unused bits set", lambda: proof(signature=lambda r: non_canonical(b64u(r))),
     SIGNATURE),
    ("ES256 signature with a stray character", lambda: proof(signature=lambda r: b64u(r) + "!"), SIGNATURE),
    ("EdDSA signature of 63 bytes", lambda: proof(key=ED, alg="EdDSA", signature=lambda r: b64u(r[:63])),
     SIGNATURE),
    ("EdDSA signature of 65 bytes", lambda: proof(key=ED, alg="EdDSA", signature=lambda r: b64u(r + b"\0")),
     SIGNATURE),
    # the key: a valid point of the right curve, coordinates of exactly 32 bytes, strict base64url
    ("P-256 point not on the curve", lambda: proof(jwk=KEY.as_dict(private=False) | {"y": b64u(y_of(OTHER))}),
     NOT_A_KEY),
    ("P-256 x of 0xff bytes (not a field element)", lambda: proof(
        jwk=KEY.as_dict(private=False) | {"x": b64u(b"\xff" * 32)}), NOT_A_KEY),
    ("P-256 x of 31 bytes", lambda: proof(jwk=KEY.as_dict(private=False) | {"x": b64u(x_of(KEY)[1:])}),
     NOT_A_KEY),
    ("P-256 y of 33 bytes (leading zero added)", lambda: proof(
        jwk=KEY.as_dict(private=False) | {"y": b64u(b"\0" + y_of(KEY))}), NOT_A_KEY),
    ("P-256 x empty", lambda: proof(jwk=KEY.as_dict(private=False) | {"x": ""}), NOT_A_KEY),
    ("P-256 x with = padding", lambda: proof(jwk=KEY.as_dict(private=False) | {"x": b64u(x_of(KEY)) + "="}),
     NOT_A_KEY),
    ("P-256 x with unused bits set", lambda: proof(
        jwk=KEY.as_dict(private=False) | {"x": non_canonical(b64u(x_of(KEY)))}), NOT_A_KEY),
    ("P-256 x a number", lambda: proof(jwk=KEY.as_dict(private=False) | {"x": 5}), NOT_A_KEY),
    ("P-256 y missing", lambda: proof(jwk={k: v for k, v in KEY.as_dict(private=False).items() if k != "y"}),
     NOT_A_KEY),
    ("Ed25519 x of 31 bytes", lambda: proof(key=ED, alg="EdDSA", jwk=ED.as_dict(private=False) | {
        "x": b64u(b64u_decode_strict(ED.as_dict(private=False)["x"])[1:])}), NOT_A_KEY),
    ("Ed25519 x of 33 bytes", lambda: proof(key=ED, alg="EdDSA", jwk=ED.as_dict(private=False) | {
        "x": b64u(b64u_decode_strict(ED.as_dict(private=False)["x"]) + b"\0")}), NOT_A_KEY),
    # the jwk's own members (RFC 7517 4.2-4.5), as joserfc checked them
    ("jwk use foo", lambda: proof(jwk=KEY.as_dict(private=False) | {"use": "foo"}), NOT_A_KEY),
    ("jwk key_ops not an operation", lambda: proof(jwk=KEY.as_dict(private=False) | {"key_ops": ["foo"]}),
     NOT_A_KEY),
    ("jwk use sig with key_ops encrypt", lambda: proof(
        jwk=KEY.as_dict(private=False) | {"use": "sig", "key_ops": ["encrypt"]}), NOT_A_KEY),
    ("jwk kid a number", lambda: proof(jwk=KEY.as_dict(private=False) | {"kid": 5}), NOT_A_KEY),
    ("jwk x5u not a URL", lambda: proof(jwk=KEY.as_dict(private=False) | {"x5u": "cert.pem"}), NOT_A_KEY),
    ("jwk use enc", lambda: proof(jwk=KEY.as_dict(private=False) | {"use": "enc"}), SIGNATURE),
    ("jwk key_ops sign only", lambda: proof(jwk=KEY.as_dict(private=False) | {"key_ops": ["sign"]}),
     SIGNATURE),
    ("jwk alg of another algorithm", lambda: proof(jwk=KEY.as_dict(private=False) | {"alg": "ES384"}),
     SIGNATURE),
    ("jwk use sig, key_ops verify, alg ES256", lambda: proof(
        jwk=KEY.as_dict(private=False) | {"use": "sig", "key_ops": ["verify"], "alg": "ES256"}), "accepted"),
    # the header, as RFC 7515 registers its members
    ("header member not registered", lambda: proof(header={"foo": "bar"}), SIGNATURE),
    ("header kid a number", lambda: proof(header={"kid": 5}), SIGNATURE),
    ("header jku not a URL", lambda: proof(header={"jku": "jwks.json"}), SIGNATURE),
    ("header crit naming an absent member", lambda: proof(header={"crit": ["kid"]}), SIGNATURE),
    ("header crit naming an unregistered member", lambda: proof(header={"crit": ["foo"], "foo": 1}),
     SIGNATURE),
    ("header crit empty", lambda: proof(header={"crit": []}), "accepted"),
    ("header b64 false without crit", lambda: proof(header={"b64": False}), SIGNATURE),
    ("header b64 true", lambda: proof(header={"b64": True}), "accepted"),
    ("header segment of 514 characters", lambda: proof(segments=lambda h, b: (of_length(h, 514), b)),
     SIGNATURE),
    ("header segment of 512 characters", lambda: proof(segments=lambda h, b: (of_length(h, 512), b)),
     "accepted"),
    ("header segment with unused bits set", lambda: proof(
        segments=lambda h, b: (non_canonical(with_unused_bits(h)), b)), SIGNATURE),
    ("header segment with = padding", lambda: proof(segments=lambda h, b: (padding(with_unused_bits(h)), b)),
     SIGNATURE),
    ("payload segment with = padding", lambda: proof(segments=lambda h, b: (h, padding(with_unused_bits(b)))),
     SIGNATURE),
    ("payload segment with a space inside", lambda: proof(segments=lambda h, b: (h, b[:8] + " " + b[8:])),
     SIGNATURE),
    ("payload segment with unused bits set, b64 false and crit b64 (RFC 7797)", lambda: proof(
        header={"b64": False, "crit": ["b64"]},
        segments=lambda h, b: (h, non_canonical(with_unused_bits(b)))),
     "accepted"),
]


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in PROOF_CASES])
def test_proof_refusal(build, expected):
    assert refusal(build()) == expected


def test_a_cached_key_is_built_once_and_still_gets_every_member_check(monkeypatch):
    cache = authsvc.dpop._ProofKeyCache(capacity=8)
    monkeypatch.setattr(authsvc.dpop, "_proof_keys", cache)
    key = ECKey.generate_key("P-256", private=True)
    first = check_public_jwk({"jwk": key.as_dict(private=False)}, "ES256")
    again = check_public_jwk({"jwk": key.as_dict(private=False) | {"kid": "d"}}, "ES256")
    assert again.public is first.public and len(cache) == 1
    # the same point, cached, with members that refuse it: refused as if it were new
    assert refusal(proof(key=key, jwk=key.as_dict(private=False) | {"use": "enc"})) == SIGNATURE
    assert refusal(proof(key=key, jwk=key.as_dict(private=False) | {"use": "foo"})) == NOT_A_KEY
    assert refusal(proof(key=key)) == "accepted"


def test_an_invalid_point_is_never_cached(monkeypatch):
    cache = authsvc.dpop._ProofKeyCache(capacity=8)
    monkeypatch.setattr(authsvc.dpop, "_proof_keys", cache)
    off_curve = KEY.as_dict(private=False) | {"y": b64u(y_of(OTHER))}
    for _ in range(2):
        with pytest.raises(InvalidDPoPProof) as exc:
            check_public_jwk({"jwk": off_curve}, "ES256")
        assert exc.value.description == NOT_A_KEY
    assert len(cache) == 0


def test_the_proof_key_cache_is_bounded_and_drops_the_least_recently_used(monkeypatch):
    cache = authsvc.dpop._ProofKeyCache(capacity=3)
    monkeypatch.setattr(authsvc.dpop, "_proof_keys", cache)
    keys = [ECKey.generate_key("P-256", private=True) for _ in range(4)]
    built = [check_public_jwk({"jwk": k.as_dict(private=False)}, "ES256").public for k in keys[:3]]
    assert check_public_jwk({"jwk": keys[0].as_dict(private=False)}, "ES256").public is built[0]  # used again
    check_public_jwk({"jwk": keys[3].as_dict(private=False)}, "ES256")  # evicts keys[1], the least recent
    assert len(cache) == 3
    assert check_public_jwk({"jwk": keys[0].as_dict(private=False)}, "ES256").public is built[0]
    assert check_public_jwk({"jwk": keys[1].as_dict(private=False)}, "ES256").public is not built[1]


# -- access tokens --------------------------------------------------------------------------------------

SIGNING = new_signing_key(NOW)
ISSUER, AUDIENCE = "https://as.example", "mqtt://localhost:1883"


def token(*, header: dict[str, Any] | None = None,
          segments: Callable[[str, str], tuple[str, str]] | None = None,
          signature: Callable[[bytes], str] = b64u, key: ECKey = SIGNING.key) -> str:
    h = {"typ": "at+jwt", "alg": "ES256", "kid": SIGNING.kid} | (header or {})
    c = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": int(NOW) + 900, "iat": int(NOW),
         "jti": uuid.uuid4().hex, "client_id": "lamp-1", "scope": "device:power", "cnf": {"jkt": "j"}}
    head, body = b64json(h), b64json(c)
    if segments is not None:
        head, body = segments(head, body)
    signing_input = f"{head}.{body}"
    return f"{signing_input}.{signature(raw_es256(key, signing_input))}"


def token_refusal(text: str, keys: dict[str, SigningKey] | None = None) -> str:
    try:
        verify_access_token(text, keys or {SIGNING.kid: SIGNING}, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    except TokenError as exc:
        return str(exc)
    return "accepted"


TOKEN_CASES: list[Any] = [
    ("valid", lambda: token(), "accepted"),
    ("signature of 63 bytes", lambda: token(signature=lambda r: b64u(r[:63])), "signature does not verify"),
    ("signature of 65 bytes", lambda: token(signature=lambda r: b64u(r + b"\0")),
     "signature does not verify"),
    ("signature DER-encoded", lambda: token(signature=der), "signature does not verify"),
    ("signature with = padding", lambda: token(signature=lambda r: b64u(r) + "=="),
     "signature does not verify"),
    ("signature with unused bits set", lambda: token(signature=lambda r: non_canonical(b64u(r))),
     "signature does not verify"),
    ("header member not registered", lambda: token(header={"foo": 1}), "signature does not verify"),
    ("header x5c not a list", lambda: token(header={"x5c": "MIIB"}), "signature does not verify"),
    ("header b64 false", lambda: token(header={"b64": False}), "signature does not verify"),
    ("header segment of 514 characters", lambda: token(segments=lambda h, b: (of_length(h, 514), b)),
     "signature does not verify"),
    ("header segment of 512 characters", lambda: token(segments=lambda h, b: (of_length(h, 512), b)),
     "accepted"),
    ("header segment with = padding", lambda: token(segments=lambda h, b: (padding(with_unused_bits(h)), b)),
     "signature does not verify"),
    ("header segment with unused bits set", lambda: token(
        segments=lambda h, b: (non_canonical(with_unused_bits(h)), b)), "signature does not verify"),
    ("payload segment with unused bits set", lambda: token(
        segments=lambda h, b: (h, non_canonical(with_unused_bits(b)))), "signature does not verify"),
]


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in TOKEN_CASES])
def test_token_refusal(build, expected):
    assert token_refusal(build()) == expected


def test_the_token_key_cache_follows_the_key_object_not_only_its_kid():
    text = token()
    assert token_refusal(text) == "accepted"  # SIGNING's public key now cached under its kid
    impostor = SigningKey(kid=SIGNING.kid, key=ECKey.generate_key("P-256", private=True), created=NOW,
                          retired=None)
    assert token_refusal(text, {SIGNING.kid: impostor}) == "signature does not verify"
    # as after a key ring reload: a new key object, the same key
    reloaded = SigningKey(kid=SIGNING.kid, key=ECKey.import_key(SIGNING.key.as_dict(private=True)),
                          created=NOW, retired=None)
    assert token_refusal(text, {SIGNING.kid: reloaded}) == "accepted"
