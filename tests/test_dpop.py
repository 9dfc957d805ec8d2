"""DPoP proofs (RFC 9449 section 4.3 checklist, protocol.md section 4), one scenario per checklist item.

Each case runs the real verifier of a real service (`open_service` on a fresh data dir) with `now`
passed in, and asserts the exact wire error code (`error`), or "accepted".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from authsvc.config import load_settings
from authsvc.datadir import open_service
from authsvc.dpop import (
    MAX_JTI_CHARS,
    MIN_JTI_RETENTION,
    DPoPVerifier,
    JtiMemory,
    NonceIssuer,
    RestartGuard,
    ath_of,
    check_alg,
    check_ath,
    check_claim_types,
    check_freshness,
    check_htm_htu,
    check_public_jwk,
    check_signature,
    check_typ,
    jwk_thumbprint,
    split_proof,
)
from authsvc.errors import InvalidDPoPProof, OAuthError, TemporarilyUnavailable
from authsvc.grants import DEVICE_CODE_GRANT
from authsvc.service import AuthService, ConnectRefused
from tests.conftest import ENV

TOKEN_TOPIC = "oauth/v1/token"
AUDIENCE = "mqtt://localhost:1883"
KEY = ECKey.generate_key("P-256", private=True)
OTHER = ECKey.generate_key("P-256", private=True)
P384 = ECKey.generate_key("P-384", private=True)
RSA = RSAKey.generate_key(2048, private=True)
ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"  # ath only hashes it


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64u(json.dumps(value).encode())


def es256(key: ECKey, signing_input: str) -> str:
    der = key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def forge(now: float, *, key: ECKey = KEY, signer: Callable[[str], str] | None = None, htm: str = "PUBLISH",
          htu: str = TOKEN_TOPIC, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
          drop: tuple[str, ...] = ()) -> str:
    """A proof built by hand: the defaults make a valid one; `header`/`claims` override, `drop` removes."""
    h: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    h |= header or {}
    c: dict[str, Any] = {"jti": uuid.uuid4().hex, "iat": int(now), "htm": htm, "htu": htu} | (claims or {})
    for name in drop:
        h.pop(name, None)
        c.pop(name, None)
    signing_input = f"{b64json(h)}.{b64json(c)}"
    return f"{signing_input}.{signer(signing_input) if signer else es256(key, signing_input)}"


def outcome(fn: Callable[[], Any]) -> str:
    """'accepted', or the wire `error` of the refusal."""
    try:
        fn()
    except OAuthError as exc:
        return exc.to_wire()["error"]
    return "accepted"


@pytest.fixture(scope="module")
def shared(initialised: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real service for the stateless tables, on a copy of the initialised data dir."""
    copy = tmp_path_factory.mktemp("dpop") / "copy"
    shutil.copytree(initialised, copy)
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        service = open_service(load_settings(copy / "data").with_ports(mqtt_port=0, http_port=0))
    yield service
    service.store.close()


def request_path(svc: AuthService, proof: Any, now: float) -> str:
    return outcome(lambda: svc.dpop.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=now))


def hs256_with(secret: bytes) -> Callable[[str], str]:
    return lambda si: b64u(hmac.new(secret, si.encode(), hashlib.sha256).digest())


def rs256_proof(now: float) -> str:
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": RSA.as_dict(private=False)}
    claims = {"jti": uuid.uuid4().hex, "iat": int(now), "htm": "PUBLISH", "htu": TOKEN_TOPIC}
    return jws.serialize_compact(header, json.dumps(claims).encode(), RSA, algorithms=["RS256"])


def tampered(now: float) -> str:
    head, _, sig = forge(now).split(".")
    body = b64json({"jti": uuid.uuid4().hex, "iat": int(now), "htm": "PUBLISH", "htu": "oauth/v1/revoke"})
    return f"{head}.{body}.{sig}"


# (case id, proof builder (svc, now) -> proof, wire outcome); each row breaks exactly one checklist item
REQUEST_CASES: list[Any] = [
    ("valid proof", lambda s, n: forge(n), "accepted"),
    # 4.3 (1)-(2): one well-formed JWT
    ("not a JWT", lambda s, n: "not-a-jwt", "invalid_dpop_proof"),
    ("two dot-separated parts", lambda s, n: "e30.e30", "invalid_dpop_proof"),
    ("empty string", lambda s, n: "", "invalid_dpop_proof"),
    ("a number instead of a string", lambda s, n: 42, "invalid_dpop_proof"),
    ("a JSON object instead of a string", lambda s, n: {"typ": "dpop+jwt"}, "invalid_dpop_proof"),
    ("JWE-shaped five parts", lambda s, n: "a.b.c.d.e", "invalid_dpop_proof"),
    ("header not base64 JSON", lambda s, n: "%%%." + forge(n).split(".", 1)[1], "invalid_dpop_proof"),
    ("header a JSON array", lambda s, n: b64json([1]) + "." + forge(n).split(".", 1)[1],
     "invalid_dpop_proof"),
    ("header nested 1400 deep", lambda s, n: b64u(b"[" * 1400 + b"]" * 1400) + ".e30.AAAA",
     "invalid_dpop_proof"),
    ("over 4 KiB", lambda s, n: forge(n, claims={"pad": "x" * 4100}), "invalid_dpop_proof"),
    ("two proofs as a JSON list", lambda s, n: [forge(n), forge(n)], "invalid_dpop_proof"),
    ("two proofs joined by a comma", lambda s, n: forge(n) + "," + forge(n), "invalid_dpop_proof"),
    ("two proofs joined by a space", lambda s, n: forge(n) + " " + forge(n), "invalid_dpop_proof"),
    # 4.3 (4): typ
    ("typ missing", lambda s, n: forge(n, drop=("typ",)), "invalid_dpop_proof"),
    ("typ JWT", lambda s, n: forge(n, header={"typ": "JWT"}), "invalid_dpop_proof"),
    ("typ at+jwt", lambda s, n: forge(n, header={"typ": "at+jwt"}), "invalid_dpop_proof"),
    # 4.3 (5): asymmetric, allow-listed alg
    ("alg none, no signature", lambda s, n: forge(n, header={"alg": "none"}, signer=lambda si: ""),
     "invalid_dpop_proof"),
    ("alg NONE", lambda s, n: forge(n, header={"alg": "NONE"}, signer=lambda si: ""), "invalid_dpop_proof"),
    ("alg HS256 keyed with the jwk's x", lambda s, n: forge(
        n, header={"alg": "HS256"}, signer=hs256_with(KEY.as_dict(private=False)["x"].encode())),
     "invalid_dpop_proof"),
    ("alg RS256 not configured", lambda s, n: rs256_proof(n), "invalid_dpop_proof"),
    ("alg missing", lambda s, n: forge(n, drop=("alg",)), "invalid_dpop_proof"),
    ("alg ES256 with a P-384 jwk", lambda s, n: forge(n, header={"jwk": P384.as_dict(private=False)}),
     "invalid_dpop_proof"),
    ("alg ES256 with an RSA jwk", lambda s, n: forge(n, header={"jwk": RSA.as_dict(private=False)}),
     "invalid_dpop_proof"),
    # 4.3 (6)-(7): public jwk in the header, signature by that key
    ("jwk missing", lambda s, n: forge(n, drop=("jwk",)), "invalid_dpop_proof"),
    ("jwk a string", lambda s, n: forge(n, header={"jwk": "KEY"}), "invalid_dpop_proof"),
    ("jwk with private member d", lambda s, n: forge(n, header={"jwk": KEY.as_dict(private=True)}),
     "invalid_dpop_proof"),
    ("jwk point not on the curve", lambda s, n: forge(
        n, header={"jwk": KEY.as_dict(private=False) | {"y": OTHER.as_dict(private=False)["y"]}}),
     "invalid_dpop_proof"),
    ("signed by another key than the header jwk", lambda s, n: forge(
        n, header={"jwk": OTHER.as_dict(private=False)}), "invalid_dpop_proof"),
    ("claims altered after signing", lambda s, n: tampered(n), "invalid_dpop_proof"),
    # 4.3 (3): required claims and their types
    ("jti missing", lambda s, n: forge(n, drop=("jti",)), "invalid_dpop_proof"),
    ("jti empty", lambda s, n: forge(n, claims={"jti": ""}), "invalid_dpop_proof"),
    ("jti of 65 characters", lambda s, n: forge(n, claims={"jti": "j" * 65}), "invalid_dpop_proof"),
    ("jti of 64 characters", lambda s, n: forge(n, claims={"jti": uuid.uuid4().hex * 2}), "accepted"),
    ("jti a number", lambda s, n: forge(n, claims={"jti": 12345}), "invalid_dpop_proof"),
    ("iat missing", lambda s, n: forge(n, drop=("iat",)), "invalid_dpop_proof"),
    ("iat true", lambda s, n: forge(n, claims={"iat": True}), "invalid_dpop_proof"),
    ("iat numeric string", lambda s, n: forge(n, claims={"iat": str(int(n))}), "invalid_dpop_proof"),
    ("iat NaN", lambda s, n: forge(n, claims={"iat": float("nan")}), "invalid_dpop_proof"),
    ("iat integer too large for a float", lambda s, n: forge(n, claims={"iat": 10**400}),
     "invalid_dpop_proof"),
    ("nonce a number", lambda s, n: forge(n, claims={"nonce": 7}), "invalid_dpop_proof"),
    # 4.3 (8)-(9): htm and htu
    ("htm missing", lambda s, n: forge(n, drop=("htm",)), "invalid_dpop_proof"),
    ("htm POST", lambda s, n: forge(n, htm="POST"), "invalid_dpop_proof"),
    ("htm CONNECT on a request", lambda s, n: forge(n, htm="CONNECT"), "invalid_dpop_proof"),
    ("htm lower case", lambda s, n: forge(n, htm="publish"), "invalid_dpop_proof"),
    ("htu missing", lambda s, n: forge(n, drop=("htu",)), "invalid_dpop_proof"),
    ("htu another request topic", lambda s, n: forge(n, htu="oauth/v1/device_authorization"),
     "invalid_dpop_proof"),
    ("htu with a trailing slash", lambda s, n: forge(n, htu=TOKEN_TOPIC + "/"), "invalid_dpop_proof"),
    ("htu as a URL", lambda s, n: forge(n, htu=f"{AUDIENCE}/{TOKEN_TOPIC}"), "invalid_dpop_proof"),
    # 4.3 (12): ath only with an access token
    ("ath present without an access token", lambda s, n: forge(n, claims={"ath": ath_of(ACCESS_TOKEN)}),
     "invalid_dpop_proof"),
    # 4.3 (10)-(11): iat window, or a server nonce whatever the iat
    ("iat 60 s old", lambda s, n: forge(n - 60), "accepted"),
    ("iat 60 s ahead", lambda s, n: forge(n + 60), "accepted"),
    ("iat 61 s old", lambda s, n: forge(n - 61), "use_dpop_nonce"),
    ("iat 61 s ahead", lambda s, n: forge(n + 61), "use_dpop_nonce"),
    ("iat 61 s old with the server nonce", lambda s, n: forge(n - 61, claims={"nonce": s.current_nonce(n)}),
     "accepted"),
    ("iat 61 s ahead with the server nonce", lambda s, n: forge(n + 61, claims={"nonce": s.current_nonce(n)}),
     "accepted"),
    ("iat a day old with the server nonce",
     lambda s, n: forge(n - 86400, claims={"nonce": s.current_nonce(n)}), "accepted"),
    ("made-up nonce with a fresh iat", lambda s, n: forge(n, claims={"nonce": b64u(b"\0" * 24)}),
     "use_dpop_nonce"),
    ("made-up nonce with a stale iat", lambda s, n: forge(n - 600, claims={"nonce": "abc"}),
     "use_dpop_nonce"),
    ("empty nonce", lambda s, n: forge(n, claims={"nonce": ""}), "use_dpop_nonce"),
    ("nonce of another server", lambda s, n: forge(n, claims={"nonce": nonce_of_another_server(n)}),
     "use_dpop_nonce"),
]


def nonce_of_another_server(now: float) -> str:
    return NonceIssuer(b"another server's secret", 300).current(now)


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in REQUEST_CASES])
def test_request_proof_outcome(shared, build, expected):
    now = float(int(time.time()))
    assert request_path(shared, build(shared, now), now) == expected


CONNECT_CASES: list[Any] = [
    ("ath of the presented token", lambda n: forge(n, htm="CONNECT", htu=AUDIENCE,
                                                   claims={"ath": ath_of(ACCESS_TOKEN)}), "accepted"),
    ("ath missing", lambda n: forge(n, htm="CONNECT", htu=AUDIENCE), "invalid_dpop_proof"),
    ("ath of another token", lambda n: forge(n, htm="CONNECT", htu=AUDIENCE,
                                             claims={"ath": ath_of(ACCESS_TOKEN + "x")}),
     "invalid_dpop_proof"),
    ("ath not base64url-encoded", lambda n: forge(
        n, htm="CONNECT", htu=AUDIENCE, claims={"ath": hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest()}),
     "invalid_dpop_proof"),
    ("ath a list", lambda n: forge(n, htm="CONNECT", htu=AUDIENCE, claims={"ath": [ath_of(ACCESS_TOKEN)]}),
     "invalid_dpop_proof"),
    ("htm PUBLISH at CONNECT", lambda n: forge(n, htm="PUBLISH", htu=AUDIENCE,
                                               claims={"ath": ath_of(ACCESS_TOKEN)}), "invalid_dpop_proof"),
    ("htu the broker's address instead of its audience", lambda n: forge(
        n, htm="CONNECT", htu="mqtt://127.0.0.1:1883", claims={"ath": ath_of(ACCESS_TOKEN)}),
     "invalid_dpop_proof"),
]


@pytest.mark.parametrize("build, expected", [pytest.param(b, e, id=i) for i, b, e in CONNECT_CASES])
def test_connect_proof_outcome(shared, build, expected):
    now = float(int(time.time()))
    got = outcome(lambda: shared.dpop.verify(build(now), htm="CONNECT", htu=AUDIENCE, now=now,
                                          access_token=ACCESS_TOKEN))
    assert got == expected


# -- each checklist item on its own: its named function passes a good input and refuses its defect --------

NOW = 1_800_000_000.0
NONCES = NonceIssuer(b"k" * 32, 300)
GOOD_CLAIMS = {"jti": "j-1", "iat": int(NOW), "htm": "PUBLISH", "htu": TOKEN_TOPIC}


def remember_twice() -> None:
    memory = JtiMemory()
    memory.remember("jkt", "j-1", NOW + 600, NOW)
    memory.remember("jkt", "j-1", NOW + 600, NOW + 1)


CHECKS: list[Any] = [
    ("split_proof", lambda: split_proof(forge(NOW)), lambda: split_proof("a.b"), "invalid_dpop_proof"),
    ("check_typ", lambda: check_typ({"typ": "dpop+jwt"}), lambda: check_typ({"typ": "jwt"}), "invalid_dpop_proof"),
    ("check_alg", lambda: check_alg({"alg": "ES256"}, ("ES256",)),
     lambda: check_alg({"alg": "HS256"}, ("ES256", "HS256")), "invalid_dpop_proof"),  # even if listed
    ("check_public_jwk", lambda: check_public_jwk({"jwk": KEY.as_dict(private=False)}, "ES256"),
     lambda: check_public_jwk({"jwk": KEY.as_dict(private=True)}, "ES256"), "invalid_dpop_proof"),
    ("check_signature", lambda: check_signature(forge(NOW), ECKey.import_key(KEY.as_dict(private=False)), "ES256"),
     lambda: check_signature(forge(NOW, key=OTHER), ECKey.import_key(KEY.as_dict(private=False)), "ES256"),
     "invalid_dpop_proof"),
    ("check_claim_types", lambda: check_claim_types(GOOD_CLAIMS),
     lambda: check_claim_types(GOOD_CLAIMS | {"iat": "1800000000"}), "invalid_dpop_proof"),
    ("check_htm_htu", lambda: check_htm_htu(GOOD_CLAIMS, "PUBLISH", TOKEN_TOPIC),
     lambda: check_htm_htu(GOOD_CLAIMS, "CONNECT", AUDIENCE), "invalid_dpop_proof"),
    ("check_ath", lambda: check_ath(GOOD_CLAIMS | {"ath": ath_of(ACCESS_TOKEN)}, ACCESS_TOKEN),
     lambda: check_ath(GOOD_CLAIMS, ACCESS_TOKEN), "invalid_dpop_proof"),
    ("check_freshness by iat", lambda: check_freshness(GOOD_CLAIMS, NONCES, NOW + 60, 60),
     lambda: check_freshness(GOOD_CLAIMS, NONCES, NOW + 61, 60), "use_dpop_nonce"),
    ("check_freshness by nonce", lambda: check_freshness(GOOD_CLAIMS | {"iat": 0, "nonce": NONCES.current(NOW)},
                                                         NONCES, NOW, 60),
     lambda: check_freshness(GOOD_CLAIMS | {"nonce": NONCES.current(NOW - 600)}, NONCES, NOW, 60),
     "use_dpop_nonce"),
    ("jwk_thumbprint", lambda: jwk_thumbprint(RFC9449_EC), lambda: jwk_thumbprint({"kty": "oct", "k": "AA"}),
     "invalid_dpop_proof"),
    ("JtiMemory.remember", lambda: JtiMemory().remember("jkt", "j-1", NOW + 600, NOW), remember_twice,
     "invalid_dpop_proof"),
]


@pytest.mark.parametrize("good, bad, error", [pytest.param(g, b, e, id=i) for i, g, b, e in CHECKS])
def test_each_checklist_function_passes_a_good_input_and_refuses_its_defect(good, bad, error):
    assert outcome(good) == "accepted"
    assert outcome(bad) == error


# -- D3: replay ---------------------------------------------------------------------------------------

def test_the_same_proof_twice_is_refused_the_second_time(svc, clock):
    now = clock.now()
    proof = forge(now)
    assert request_path(svc, proof, now) == "accepted"
    assert request_path(svc, proof, now) == "invalid_dpop_proof"
    assert request_path(svc, proof, now + 30) == "invalid_dpop_proof"


def test_a_new_proof_reusing_a_jti_of_the_same_key_is_refused(svc, clock):
    now = clock.now()
    assert request_path(svc, forge(now, claims={"jti": "fixed-jti"}), now) == "accepted"
    assert request_path(svc, forge(now + 1, claims={"jti": "fixed-jti"}), now + 1) == "invalid_dpop_proof"
    # the memory is per key: another device may pick the same jti
    assert request_path(svc, forge(now + 1, key=OTHER, claims={"jti": "fixed-jti"}), now + 1) == "accepted"


def test_a_refused_proof_does_not_burn_its_jti(svc, clock):
    now = clock.now()
    assert request_path(svc, forge(now - 120, claims={"jti": "retry-me"}), now) == "use_dpop_nonce"
    assert request_path(svc, forge(now, claims={"jti": "retry-me", "nonce": svc.current_nonce(now)}), now) \
        == "accepted"


# -- server nonces: current and previous fixed 5-minute steps ------------------------------------------

def step_start(svc: AuthService, now: float) -> float:
    step = svc.settings.nonce_step
    return (now // step + 1) * step  # the first second of the next step


@pytest.mark.parametrize("seconds_later, expected", [
    pytest.param(0, "accepted", id="same step, first second"),
    pytest.param(299, "accepted", id="same step, last second"),
    pytest.param(300, "accepted", id="previous-step nonce, first second of the next step"),
    pytest.param(599, "accepted", id="previous-step nonce, last second"),
    pytest.param(600, "use_dpop_nonce", id="nonce two steps old"),
    pytest.param(3600, "use_dpop_nonce", id="nonce an hour old"),
])
def test_nonce_is_valid_for_its_step_and_the_next(shared, seconds_later, expected):
    issued = step_start(shared, time.time())
    nonce = shared.current_nonce(issued)
    now = issued + seconds_later
    assert request_path(shared, forge(issued, claims={"nonce": nonce}), now) == expected


def test_the_current_nonce_changes_each_step_and_differs_between_services(svc, clock):
    issued = step_start(svc, clock.now())
    assert svc.current_nonce(issued) == svc.current_nonce(issued + 299)
    assert svc.current_nonce(issued) != svc.current_nonce(issued + 300)
    assert svc.current_nonce(issued) != nonce_of_another_server(issued)


def test_a_proof_accepted_with_a_nonce_at_the_edge_cannot_be_replayed_while_the_nonce_lives(svc, clock):
    issued = step_start(svc, clock.now())
    proof = forge(issued, claims={"nonce": svc.current_nonce(issued)})
    assert request_path(svc, proof, issued) == "accepted"
    # the nonce still validates at issued + 599: only the jti memory stands between this and a replay
    assert svc.dpop.nonces.is_valid(svc.current_nonce(issued), issued + 599)
    assert request_path(svc, proof, issued + 599) == "invalid_dpop_proof"
    assert request_path(svc, proof, issued + 600) == "use_dpop_nonce"


def test_a_proof_accepted_by_its_iat_at_the_edge_cannot_be_replayed(svc, clock):
    now = clock.now()
    proof = forge(now + 60)  # accepted 60 s before its iat, acceptable until 60 s after
    assert request_path(svc, proof, now) == "accepted"
    assert request_path(svc, proof, now + 120) == "invalid_dpop_proof"
    assert request_path(svc, proof, now + 121) == "use_dpop_nonce"


def test_jti_memory_refuses_new_proofs_at_capacity_and_recovers(svc, clock, caplog):
    now = clock.now()
    svc.dpop.jtis.capacity = 3
    first = forge(now)
    assert [request_path(svc, p, now) for p in (first, forge(now), forge(now))] == ["accepted"] * 3
    with pytest.raises(TemporarilyUnavailable) as full:
        svc.dpop.verify(forge(now), htm="PUBLISH", htu=TOKEN_TOPIC, now=now)
    assert full.value.detail == "the DPoP jti memory is full (3 proofs kept)"  # the log says why
    assert request_path(svc, first, now) == "invalid_dpop_proof"  # a replay is still a replay when full
    later = now + MIN_JTI_RETENTION + 1
    assert request_path(svc, forge(later), later) == "accepted"  # expired entries make room
    assert len(svc.dpop.jtis) == 1


def test_a_full_jti_memory_refuses_new_keys_but_never_a_paired_devices_key(svc, clock):
    """A flood of throwaway keys from many addresses fills the memory: pairing waits, paired devices don't."""
    now = clock.now()
    token = paired(svc, now)["access_token"]
    svc.dpop.jtis.capacity = len(svc.dpop.jtis)
    with pytest.raises(TemporarilyUnavailable, match="the DPoP jti memory is full"):
        svc.dpop.verify(forge(now, key=OTHER), htm="PUBLISH", htu=TOKEN_TOPIC, now=now)
    device = svc.authorize_connect("lamp-1", "lamp-1", f"{token} {connect_proof(svc, token, now)}", now)
    assert device.client_id == "lamp-1"  # its key is bound to a live grant: kept under a quota of its own


def test_a_paired_key_past_its_own_quota_is_refused_with_connack_5_and_the_reason(svc, clock, monkeypatch):
    now = clock.now()
    token = paired(svc, now)["access_token"]
    svc.dpop.jtis.capacity = len(svc.dpop.jtis)
    monkeypatch.setattr("authsvc.dpop.PER_TRUSTED_KEY", 0)
    with pytest.raises(ConnectRefused, match="the DPoP jti memory is full") as exc:
        svc.authorize_connect("lamp-1", "lamp-1", f"{token} {connect_proof(svc, token, now)}", now)
    assert exc.value.code == 5  # protocol.md section 6: any CONNECT failure is CONNACK 5


def test_a_revoked_devices_key_gets_no_reserve(svc, clock):
    now = clock.now()
    paired(svc, now)
    svc.revoke_client("lamp-1", now)
    svc.dpop.jtis.capacity = len(svc.dpop.jtis)
    with pytest.raises(TemporarilyUnavailable):
        svc.dpop.verify(forge(now), htm="PUBLISH", htu=TOKEN_TOPIC, now=now)


def test_jti_memory_keeps_each_entry_until_its_acceptance_deadline_and_at_least_ten_minutes(svc, clock):
    now = clock.now()
    jkt = KEY.thumbprint()
    issued = step_start(svc, now)
    cases = {
        "iat now": (forge(now), now, now + 600),  # iat + 60 is sooner: the 10-minute floor
        "iat 60 s ahead": (forge(now + 60), now, now + 600),
        "nonce of this step": (forge(issued, claims={"nonce": svc.current_nonce(issued)}), issued, issued + 600),
        "nonce of the step before": (forge(issued + 300, claims={"nonce": svc.current_nonce(issued)}),
                                     issued + 300, issued + 900),  # the nonce lives until issued + 600 only
    }
    for name, (proof, at, floor) in cases.items():
        accepted = svc.dpop.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=at)
        assert svc.dpop.jtis.kept_until(jkt, accepted.jti) == floor, name


@pytest.mark.parametrize("window, step, build, seen, replay", [
    pytest.param(400, 300, lambda n, nonces: forge(n + 400), 0, 800,
                 id="iat window 400 s: a proof 400 s ahead is kept until iat + 400"),
    pytest.param(60, 900, lambda n, nonces: forge(n, claims={"nonce": nonces.current(n)}), 0, 1799,
                 id="nonce step 900 s: a nonce proof is kept while its nonce lives"),
])
def test_jti_memory_outlives_every_configured_acceptance_window(window, step, build, seen, replay):
    nonces = NonceIssuer(b"k" * 32, step)
    verifier = DPoPVerifier(nonces, algorithms=("ES256",), window=window)
    start = (int(time.time()) // step + 1) * step  # the first second of a nonce step
    proof = build(start, nonces)
    verifier.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=start + seen)
    # the last moment the proof is still acceptable: only the jti memory refuses the replay
    assert outcome(lambda: verifier.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=start + replay)) \
        == "invalid_dpop_proof"
    assert outcome(lambda: verifier.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=start + replay + 1)) \
        == "use_dpop_nonce"


def test_an_oversized_jti_is_refused_before_it_reaches_the_memory(svc, clock):
    now = clock.now()
    before = len(svc.dpop.jtis)
    assert request_path(svc, forge(now, claims={"jti": "j" * (MAX_JTI_CHARS + 1)}), now) == "invalid_dpop_proof"
    assert request_path(svc, forge(now, claims={"jti": "j" * 100_000}), now) == "invalid_dpop_proof"
    assert len(svc.dpop.jtis) == before


# -- one jti memory for the broker (CONNECT) and the service (requests) --------------------------------

def paired(svc: AuthService, now: float, key: ECKey = KEY) -> dict[str, Any]:
    auth = svc.handle("device_authorization", {"client_id": "lamp-1"}, now)
    svc.decide(auth["user_code"], "alice", True, now)
    return svc.handle("token", {"grant_type": DEVICE_CODE_GRANT, "device_code": auth["device_code"],
                                "client_id": "lamp-1", "dpop": forge(now, key=key)}, now)


def connect_proof(svc: AuthService, token: str, now: float, jti: str | None = None) -> str:
    return forge(now, htm="CONNECT", htu=svc.settings.audience,
                 claims={"jti": jti or uuid.uuid4().hex, "ath": ath_of(token)})


def connect(svc: AuthService, token: str, now: float, jti: str) -> str:
    proof = connect_proof(svc, token, now, jti)
    try:
        svc.authorize_connect("lamp-1", "lamp-1", f"{token} {proof}", now)
    except ConnectRefused as exc:
        return f"refused {exc.code}: {exc}"
    return "accepted"


def test_jti_used_on_a_request_is_refused_at_connect(svc, clock):
    now = clock.now()
    token = paired(svc, now)["access_token"]
    assert request_path(svc, forge(now, claims={"jti": "shared-1"}), now) == "accepted"
    assert connect(svc, token, now, "shared-1") == "refused 5: CONNECT proof refused: " \
        "The DPoP proof has been used before (jti replay)"
    assert connect(svc, token, now, "shared-2") == "accepted"


def test_jti_used_at_connect_is_refused_on_a_request(svc, clock):
    now = clock.now()
    token = paired(svc, now)["access_token"]
    assert connect(svc, token, now, "shared-3") == "accepted"
    assert request_path(svc, forge(now, claims={"jti": "shared-3"}), now) == "invalid_dpop_proof"


@pytest.mark.parametrize("password, reason", [
    pytest.param(lambda t, n: t, "password lacks the DPoP proof", id="token alone as password (D1)"),
    pytest.param(lambda t, n: f"{t} ", "password lacks the DPoP proof", id="token and an empty proof"),
    pytest.param(lambda t, n: f"{t} {forge(n, htm='CONNECT', htu=AUDIENCE)}", "ath does not match",
                 id="proof without ath"),
    pytest.param(lambda t, n: f"{t} {forge(n, htm='CONNECT', htu=AUDIENCE, claims={'ath': ath_of(t[:-1])})}",
                 "ath does not match", id="proof with the ath of another token"),
    pytest.param(lambda t, n: t + " " + forge(n, key=OTHER, htm="CONNECT", htu=AUDIENCE,
                                              claims={"ath": ath_of(t)}),
                 "proof key is not the token's cnf.jkt", id="proof signed by another key"),
    pytest.param(lambda t, n: f"{t} {forge(n - 61, htm='CONNECT', htu=AUDIENCE, claims={'ath': ath_of(t)})}",
                 "outside the acceptance window", id="stale proof without nonce"),
])
def test_connect_refused_with_a_bound_token_and_a_bad_proof(svc, clock, password, reason):
    now = clock.now()
    token = paired(svc, now)["access_token"]
    with pytest.raises(ConnectRefused, match=reason) as exc:
        svc.authorize_connect("lamp-1", "lamp-1", password(token, now), now)
    assert exc.value.code == 5


# -- D4, D5: test vectors -------------------------------------------------------------------------------

RFC7638_RSA = {  # RFC 7638 section 3.1 (the RFC 7517 A.1 key), with alg and kid present
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPeb"
         "WKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMi"
         "cAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3X"
         "PksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC9449_EC = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
              "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


def test_rfc7638_rsa_thumbprint_ignores_alg_and_kid():
    assert jwk_thumbprint(RFC7638_RSA) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("order", list(itertools.permutations(RFC9449_EC))[::5], ids=lambda o: ",".join(o))
@pytest.mark.parametrize("extra", [{}, {"kid": "k1"}, {"use": "sig", "kid": "k1", "alg": "ES256"}],
                         ids=["bare", "kid", "kid use alg"])
def test_rfc9449_ec_thumbprint_whatever_member_order_and_extras(order, extra):
    jwk = {name: RFC9449_EC[name] for name in order} | extra
    assert jwk_thumbprint(jwk) == RFC9449_JKT


def test_proof_key_thumbprint_is_the_rfc7638_thumbprint_even_with_extra_jwk_members(svc, clock):
    now = clock.now()
    jwk = {"use": "sig", "kid": "device-key"} | KEY.as_dict(private=False)
    proof = svc.dpop.verify(forge(now, header={"jwk": jwk}), htm="PUBLISH", htu=TOKEN_TOPIC, now=now)
    assert proof.jkt == KEY.thumbprint() == jwk_thumbprint(KEY.as_dict(private=False))


@pytest.mark.parametrize("jwk", [
    pytest.param({"kty": "EC", "crv": "P-256", "x": RFC9449_EC["x"]}, id="EC without y"),
    pytest.param({"kty": "RSA", "n": "AQAB"}, id="RSA without e"),
    pytest.param({"kty": "oct", "k": "c2VjcmV0"}, id="symmetric key"),
    pytest.param(RFC9449_EC | {"x": 5}, id="x a number"),
])
def test_thumbprint_of_an_incomplete_jwk_is_refused(jwk):
    with pytest.raises(InvalidDPoPProof):
        jwk_thumbprint(jwk)


def test_rfc9449_ath_vector():
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert ath_of(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


# -- through the service: the proof is checked on every endpoint that carries one ----------------------

@pytest.mark.parametrize("endpoint, params", [
    pytest.param("device_authorization", {}, id="device_authorization"),
    pytest.param("token", {"grant_type": "refresh_token", "refresh_token": "x"}, id="token"),
    pytest.param("revoke", {"token": "x"}, id="revoke"),
])
def test_every_endpoint_refuses_a_proof_for_another_topic(svc, clock, endpoint, params):
    now = clock.now()

    wrong = "oauth/v1/revoke" if endpoint != "revoke" else TOKEN_TOPIC
    with pytest.raises(OAuthError) as exc:
        svc.handle(endpoint, {"client_id": "lamp-1", "dpop": forge(now, htu=wrong), **params}, now)
    assert exc.value.to_wire()["error"] == "invalid_dpop_proof"


def test_one_source_filling_its_proof_quota_locks_out_only_itself(svc, clock):
    svc.dpop.jtis.per_source = 3
    now = clock.now()
    flood = [forge(now, key=ECKey.generate_key("P-256", private=True)) for _ in range(4)]
    for proof in flood[:3]:
        svc.verify_request_proof(proof, "token", now, "10.0.0.66")
    assert outcome(lambda: svc.verify_request_proof(flood[3], "token", now, "10.0.0.66")) \
        == "temporarily_unavailable"
    assert outcome(lambda: svc.verify_request_proof(forge(now), "token", now, "10.0.0.7")) == "accepted"
    clock.advance(MIN_JTI_RETENTION + 1)  # the flooder's entries expire; so does its lock-out
    assert outcome(lambda: svc.verify_request_proof(flood[3], "token", clock.now(), "10.0.0.66")) \
        == "use_dpop_nonce"
    assert outcome(lambda: svc.verify_request_proof(forge(clock.now()), "token", clock.now(), "10.0.0.66")) \
        == "accepted"


# -- replays across a restart: the horizon of nonce-less proofs (dpop.RestartGuard) -----------------------

def test_a_later_service_refuses_the_nonce_less_proofs_an_earlier_one_may_have_accepted(svc, clock, settings):
    now = clock.now()
    seen = forge(now + 60)  # acceptable until now + 120, in any process
    assert request_path(svc, seen, now) == "accepted"
    svc.store.close()
    later = open_service(settings)  # a restart: a new jti memory and a new nonce secret
    try:
        at = now + 5
        assert request_path(later, seen, at) == "use_dpop_nonce"  # the replay
        assert request_path(later, forge(at), at) == "use_dpop_nonce"  # cannot be told from one
        assert request_path(later, forge(at, claims={"nonce": later.current_nonce(at)}), at) == "accepted"
        horizon = later.dpop.restart_guard.earlier
        assert horizon >= now + 120
        assert request_path(later, forge(horizon - 60), horizon - 60) == "use_dpop_nonce"
        assert request_path(later, forge(horizon - 59), horizon - 59) == "accepted"  # too new to be a replay
    finally:
        later.store.close()


def test_a_fresh_data_dir_accepts_nonce_less_proofs_at_once(svc, clock):
    assert svc.dpop.restart_guard.earlier == 0.0
    assert request_path(svc, forge(clock.now()), clock.now()) == "accepted"


def test_the_horizon_is_recorded_before_acceptance_and_at_most_once_a_window():
    recorded: list[float] = []
    guard = RestartGuard(0.0, recorded.append, ahead=180)
    verifier = DPoPVerifier(NonceIssuer(b"k" * 32, 300), algorithms=("ES256",), window=60, restart_guard=guard)
    start = 1_800_000_000.0
    for at in range(0, 241, 10):
        verifier.verify(forge(start + at), htm="PUBLISH", htu=TOKEN_TOPIC, now=start + at)
    verifier.verify(forge(start + 300, claims={"nonce": verifier.nonces.current(start + 300)}),
                    htm="PUBLISH", htu=TOKEN_TOPIC, now=start + 300)  # a nonce proof needs no horizon
    assert recorded == [start + 180, start + 130 + 180]


def test_a_horizon_that_cannot_be_recorded_refuses_the_proof_without_burning_its_jti(svc, clock, settings):
    now = clock.now()
    proof = forge(now)
    svc.store.set_busy_timeout(0.05)
    other = sqlite3.connect(settings.db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # e.g. `iotauth approve` holding the write lock
    try:
        with pytest.raises(TemporarilyUnavailable, match="cannot record the DPoP restart horizon"):
            svc.dpop.verify(proof, htm="PUBLISH", htu=TOKEN_TOPIC, now=now)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert svc.store.no_nonce_horizon() == 0.0
    assert request_path(svc, proof, now) == "accepted"
    assert svc.store.no_nonce_horizon() == now + 180


def test_the_recorded_horizon_only_moves_later(svc):
    svc.store.raise_no_nonce_horizon(2_000_000_000.5)
    svc.store.raise_no_nonce_horizon(1_000_000_000.0)
    assert svc.store.no_nonce_horizon() == 2_000_000_000.5
