"""Access tokens (RFC 9068, RFC 8725): only the service's own keys, algorithm and issuer ever verify a token.

Forged tokens are built by hand (base64url JSON + a signature from `cryptography`), so nothing in the
JOSE library can quietly fix them up. Each case names the reason it must be refused for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey

from authsvc.config import load_settings
from authsvc.datadir import init_data_dir, open_service
from authsvc.dpop import ath_of
from authsvc.service import AuthService, ConnectRefused
from authsvc.tokens import TokenError, issue_access_token, verify_access_token
from tests.wire import make_proof

DEVICE = ECKey.generate_key("P-256", private=True)
ATTACKER = ECKey.generate_key("P-256", private=True)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256_by(key: ECKey) -> Callable[[str], str]:
    def sign(signing_input: str) -> str:
        r, s = decode_dss_signature(key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return sign


def hs256_by(secret: bytes) -> Callable[[str], str]:
    return lambda si: b64u(hmac.new(secret, si.encode(), hashlib.sha256).digest())


def unsigned(signing_input: str) -> str:
    return ""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real service: verification is stateless, and a data dir per case costs an argon2 hash."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("IOTAUTH_MASTER_KEY", "IOTAUTH_ACCESS_TOKEN_TTL", "IOTAUTH_ADMIN_PASSWORD"):
            mp.delenv(name, raising=False)
        settings = load_settings(tmp_path_factory.mktemp("tokens") / "data")
        init_data_dir(settings, force=False, now=time.time())
        service = open_service(settings)
    yield service
    service.store.close()


def forge(svc: AuthService, now: float, *, header: dict[str, Any] | None = None,
          claims: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
          signer: Callable[[str], str] | None = None) -> str:
    """A token built by hand; the defaults give exactly what the service issues, signed with its key."""
    key = svc.keys.active
    h: dict[str, Any] = {"typ": "at+jwt", "alg": "ES256", "kid": key.kid} | (header or {})
    c: dict[str, Any] = {"iss": svc.settings.issuer, "sub": "alice", "aud": svc.settings.audience,
                         "exp": int(now) + 900, "iat": int(now), "jti": uuid.uuid4().hex,
                         "client_id": "lamp-1", "scope": "device:power", "cnf": {"jkt": DEVICE.thumbprint()}}
    c |= claims or {}
    for name in drop:
        h.pop(name, None)
        c.pop(name, None)
    signing_input = f"{b64u(json.dumps(h).encode())}.{b64u(json.dumps(c).encode())}"
    return f"{signing_input}.{(signer or es256_by(key.key))(signing_input)}"


def issued(svc: AuthService, now: float) -> str:
    return issue_access_token(svc.keys.active, issuer=svc.settings.issuer, audience=svc.settings.audience,
                              sub="alice", client_id="lamp-1", scope="device:power", jkt=DEVICE.thumbprint(),
                              now=now, ttl=900)[0]


def public_pem(svc: AuthService) -> bytes:
    return svc.keys.active.key.as_pem(private=False)


def public_jwk_json(svc: AuthService) -> bytes:
    return json.dumps(svc.keys.active.public_jwk()).encode()


def resigned(token: str, **claims: Any) -> str:
    """Change claims of a real token but keep its signature."""
    head, body, sig = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) | claims
    return f"{head}.{b64u(json.dumps(decoded).encode())}.{sig}"


ACCEPTED = "accepted"
# (case id, builder (svc, now) -> token, ACCEPTED or a fragment of the refusal reason)
CASES: list[Any] = [
    ("issued by the service", lambda s, n: issued(s, n), ACCEPTED),
    ("built by hand like the service does", lambda s, n: forge(s, n), ACCEPTED),
    ("typ application/at+jwt", lambda s, n: forge(s, n, header={"typ": "application/at+jwt"}), ACCEPTED),
    # J1: the key comes from our key ring only, never from the token
    ("attacker key embedded as jwk, no kid", lambda s, n: forge(
        s, n, header={"jwk": ATTACKER.as_dict(private=False)}, drop=("kid",), signer=es256_by(ATTACKER)),
     "kid is not one of the service's keys"),
    ("attacker key embedded as jwk, kid of that key", lambda s, n: forge(
        s, n, header={"jwk": ATTACKER.as_dict(private=False), "kid": ATTACKER.thumbprint()},
        signer=es256_by(ATTACKER)), "kid is not one of the service's keys"),
    ("real kid, attacker jwk embedded, attacker signature", lambda s, n: forge(
        s, n, header={"jwk": ATTACKER.as_dict(private=False)}, signer=es256_by(ATTACKER)),
     "signature does not verify"),
    ("real kid, foreign signature", lambda s, n: forge(s, n, signer=es256_by(ATTACKER)),
     "signature does not verify"),
    ("real kid, jku to the attacker's JWKS", lambda s, n: forge(
        s, n, header={"jku": "http://evil.example/jwks.json"}, signer=es256_by(ATTACKER)),
     "signature does not verify"),
    ("real kid, x5u to the attacker's certificate", lambda s, n: forge(
        s, n, header={"x5u": "http://evil.example/cert.pem"}, signer=es256_by(ATTACKER)),
     "signature does not verify"),
    ("attacker key embedded as jwk and x5c, kid of the attacker", lambda s, n: forge(
        s, n, header={"jwk": ATTACKER.as_dict(private=False), "x5c": ["MIIB"], "kid": "attacker"},
        signer=es256_by(ATTACKER)), "kid is not one of the service's keys"),
    ("claims widened after signing",
     lambda s, n: resigned(issued(s, n), scope="device:power control:power"), "signature does not verify"),
    ("kid missing", lambda s, n: forge(s, n, drop=("kid",)), "kid is not one of the service's keys"),
    ("kid a number", lambda s, n: forge(s, n, header={"kid": 1}), "kid is not one of the service's keys"),
    # J2: the algorithm comes from our allow-list, never from the token
    ("HS256 keyed with the service public key as PEM", lambda s, n: forge(
        s, n, header={"alg": "HS256"}, signer=hs256_by(public_pem(s))), "alg 'HS256' is not allowed"),
    ("HS256 keyed with the service public key as JWK JSON", lambda s, n: forge(
        s, n, header={"alg": "HS256"}, signer=hs256_by(public_jwk_json(s))), "alg 'HS256' is not allowed"),
    ("alg none", lambda s, n: forge(s, n, header={"alg": "none"}, signer=unsigned),
     "alg 'none' is not allowed"),
    ("alg NONE", lambda s, n: forge(s, n, header={"alg": "NONE"}, signer=unsigned),
     "alg 'NONE' is not allowed"),
    ("alg none with the real signature kept", lambda s, n: forge(s, n, header={"alg": "none"}),
     "alg 'none' is not allowed"),
    ("alg missing", lambda s, n: forge(s, n, drop=("alg",)), "alg None is not allowed"),
    # J3: exact issuer
    ("iss http", lambda s, n: forge(s, n, claims={"iss": "http"}), "iss does not match"),
    ("iss a prefix of the issuer", lambda s, n: forge(s, n, claims={"iss": s.settings.issuer[:-1]}),
     "iss does not match"),
    ("iss with a trailing slash", lambda s, n: forge(s, n, claims={"iss": s.settings.issuer + "/"}),
     "iss does not match"),
    ("iss <issuer>.evil", lambda s, n: forge(s, n, claims={"iss": s.settings.issuer + ".evil"}),
     "iss does not match"),
    ("iss upper case", lambda s, n: forge(s, n, claims={"iss": s.settings.issuer.upper()}),
     "iss does not match"),
    ("iss a list holding the issuer", lambda s, n: forge(s, n, claims={"iss": [s.settings.issuer]}),
     "iss does not match"),
    ("iss missing", lambda s, n: forge(s, n, drop=("iss",)), "iss does not match"),
    # J4: time claims are JSON numbers; typ at+jwt
    ('exp "0"', lambda s, n: forge(s, n, claims={"exp": "0"}), "exp must be a JSON number"),
    ("exp null", lambda s, n: forge(s, n, claims={"exp": None}), "exp must be a JSON number"),
    ("exp true", lambda s, n: forge(s, n, claims={"exp": True}), "exp must be a JSON number"),
    ("exp a numeric string", lambda s, n: forge(s, n, claims={"exp": str(int(n) + 900)}),
     "exp must be a JSON number"),
    ("exp Infinity", lambda s, n: forge(s, n, claims={"exp": float("inf")}), "exp must be a JSON number"),
    ("exp missing", lambda s, n: forge(s, n, drop=("exp",)), "exp must be a JSON number"),
    ("iat a numeric string", lambda s, n: forge(s, n, claims={"iat": str(int(n))}),
     "iat must be a JSON number"),
    ("exp an integer too large for a float", lambda s, n: forge(s, n, claims={"exp": 10**400}),
     "exp must be a JSON number"),
    ("iat missing", lambda s, n: forge(s, n, drop=("iat",)), "iat must be a JSON number"),
    ("iat true", lambda s, n: forge(s, n, claims={"iat": True}), "iat must be a JSON number"),
    ("nbf null", lambda s, n: forge(s, n, claims={"nbf": None}), "nbf must be a JSON number"),
    ("nbf false", lambda s, n: forge(s, n, claims={"nbf": False}), "nbf must be a JSON number"),
    ('nbf "0"', lambda s, n: forge(s, n, claims={"nbf": "0"}), "nbf must be a JSON number"),
    ("nbf now", lambda s, n: forge(s, n, claims={"nbf": int(n)}), ACCEPTED),
    ("nbf 60 s in the future", lambda s, n: forge(s, n, claims={"nbf": int(n) + 60}), ACCEPTED),
    ("a DPoP proof presented as an access token", lambda s, n: make_proof(
        DEVICE, "CONNECT", s.settings.audience, iat=n), "typ 'dpop+jwt' is not at+jwt"),
    ("typ JWT, signed by the service key", lambda s, n: forge(s, n, header={"typ": "JWT"}),
     "typ 'JWT' is not at+jwt"),
    ("typ missing, signed by the service key", lambda s, n: forge(s, n, drop=("typ",)),
     "typ None is not at+jwt"),
    ("expired one second ago", lambda s, n: forge(s, n, claims={"exp": int(n) - 1}), "expired"),
    ("expiring this second", lambda s, n: forge(s, n, claims={"exp": int(n)}), "expired"),
    ("iat 60 s in the future", lambda s, n: forge(s, n, claims={"iat": int(n) + 60}), ACCEPTED),
    ("iat 61 s in the future", lambda s, n: forge(s, n, claims={"iat": int(n) + 61}), "issued in the future"),
    ("nbf 61 s in the future", lambda s, n: forge(s, n, claims={"nbf": int(n) + 61}), "issued in the future"),
    # audience
    ("aud an array holding the audience", lambda s, n: forge(
        s, n, claims={"aud": ["mqtt://other:1883", s.settings.audience]}), ACCEPTED),
    ("aud an array without the audience", lambda s, n: forge(
        s, n, claims={"aud": ["mqtt://other:1883", s.settings.issuer]}), "aud does not name the broker"),
    ("aud another broker", lambda s, n: forge(s, n, claims={"aud": "mqtt://localhost:1884"}),
     "aud does not name the broker"),
    ("aud missing", lambda s, n: forge(s, n, drop=("aud",)), "aud does not name the broker"),
    ("aud with a trailing slash", lambda s, n: forge(s, n, claims={"aud": s.settings.audience + "/"}),
     "aud does not name the broker"),
    ("aud upper case", lambda s, n: forge(s, n, claims={"aud": s.settings.audience.upper()}),
     "aud does not name the broker"),
    ("aud an array holding a prefix of the audience", lambda s, n: forge(
        s, n, claims={"aud": [s.settings.audience[:-1]]}), "aud does not name the broker"),
    ("aud an array with a non-string member", lambda s, n: forge(
        s, n, claims={"aud": [s.settings.audience, 7]}), "aud does not name the broker"),
    ("aud an object naming the audience", lambda s, n: forge(
        s, n, claims={"aud": {s.settings.audience: True}}), "aud does not name the broker"),
    # the rest of the profile
    ("crit header", lambda s, n: forge(s, n, header={"crit": ["exp"]}), "crit header present"),
    ("crit an empty list", lambda s, n: forge(s, n, header={"crit": []}), "crit header present"),
    ("cnf missing", lambda s, n: forge(s, n, drop=("cnf",)), "cnf missing"),
    ("cnf without jkt", lambda s, n: forge(s, n, claims={"cnf": {"jkt": 5}}), "cnf has neither"),
    ("client_id a number", lambda s, n: forge(s, n, claims={"client_id": 7}), "client_id must be a string"),
    ("scope a list", lambda s, n: forge(s, n, claims={"scope": ["device:power"]}), "scope must be a string"),
    ("header nested 2900 deep", lambda s, n: b64u(b"[" * 2900 + b"]" * 2900) + ".e30.AAAA",
     "not well-formed"),
    ("two parts", lambda s, n: ".".join(forge(s, n).split(".")[:2]), "not a compact JWS"),
    ("over 8 KiB", lambda s, n: forge(s, n, claims={"pad": "x" * 8192}), "not a compact JWS"),
]


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_access_token_outcome(svc, build, expected):
    now = float(int(time.time()))
    token = build(svc, now)
    kwargs = {"issuer": svc.settings.issuer, "audience": svc.settings.audience, "now": now}
    if expected == ACCEPTED:
        claims = verify_access_token(token, svc.keys.verification_keys(), **kwargs)
        assert (claims.client_id, claims.jkt) == ("lamp-1", DEVICE.thumbprint())
    else:
        with pytest.raises(TokenError) as exc:
            verify_access_token(token, svc.keys.verification_keys(), **kwargs)
        assert expected in str(exc.value)


@pytest.mark.parametrize("build, reason", [pytest.param(b, e, id=i) for i, b, e in CASES if e != ACCEPTED])
def test_broker_refuses_the_same_tokens_at_connect(svc, build, reason):
    """The CONNECT path uses the same verifier: a refused token is CONNACK 5, whatever the proof."""
    now = float(int(time.time()))
    token = build(svc, now)
    proof = make_proof(DEVICE, "CONNECT", svc.settings.audience, iat=now, token=token)
    with pytest.raises(ConnectRefused, match="access token refused") as exc:
        svc.authorize_connect("lamp-1", "lamp-1", f"{token} {proof}", now)
    assert exc.value.code == 5
    assert reason in str(exc.value)


def test_a_token_of_another_service_instance_is_refused(svc, tmp_path, monkeypatch):
    monkeypatch.delenv("IOTAUTH_MASTER_KEY", raising=False)
    settings = load_settings(tmp_path / "other")
    init_data_dir(settings, force=False, now=time.time())
    other = open_service(settings)
    try:
        now = float(int(time.time()))
        token = issued(other, now)
        assert other.settings.issuer == svc.settings.issuer  # same name, different keys
        with pytest.raises(TokenError, match="kid is not one of the service's keys"):
            verify_access_token(token, svc.keys.verification_keys(), issuer=svc.settings.issuer,
                                audience=svc.settings.audience, now=now)
        forged_kid = forge(svc, now, signer=es256_by(other.keys.active.key))  # our kid, their signature
        with pytest.raises(TokenError, match="signature does not verify"):
            verify_access_token(forged_kid, svc.keys.verification_keys(), issuer=svc.settings.issuer,
                                audience=svc.settings.audience, now=now)
    finally:
        other.store.close()


def test_issued_token_has_the_rfc9068_header_and_claims(svc):
    now = float(int(time.time()))
    token, claims = issue_access_token(svc.keys.active, issuer=svc.settings.issuer,
                                       audience=svc.settings.audience, sub="alice", client_id="lamp-1",
                                       scope="device:power", jkt=DEVICE.thumbprint(), now=now, ttl=900)
    head = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert head == {"typ": "at+jwt", "alg": "ES256", "kid": svc.keys.active.kid}
    assert set(claims) == {"iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "cnf"}
    assert claims["exp"] - claims["iat"] == 900 and claims["cnf"] == {"jkt": DEVICE.thumbprint()}
    assert ath_of(token) != ath_of(issued(svc, now))  # every token has its own jti
