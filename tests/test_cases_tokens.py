"""cases.md, sections "DPoP and tokens" and "Refresh tokens": one test per case id, on the real server.

Each test drives the case over real MQTT (tests.wire) and asserts the exact refusal: the wire `error` of a
request, or CONNACK 5 plus the logged reason (protocol.md section 6 gives every CONNECT failure the same
code, so the log is what shows it was refused for the case's reason and not another). R1 runs real
threads on the real SQLite file instead, each with its own service, as 20 processes would. The detailed
scenario tables live beside the code they test: tests/test_dpop.py (D1-D5, one row per RFC 9449 checklist
item), tests/test_tokens.py (J1-J4, also at CONNECT) and tests/test_refresh.py (R1-R3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

import pytest
from joserfc.jwk import ECKey

from authsvc.dpop import ath_of, jwk_thumbprint
from tests.test_dpop import RFC7638_RSA, RFC9449_EC, RFC9449_JKT, hs256_with
from tests.test_dpop import forge as forge_proof
from tests.test_refresh import refresh_in_threads
from tests.test_tokens import (
    ATTACKER,
    DEVICE,
    es256_by,
    hs256_by,
    public_jwk_json,
    public_pem,
    unsigned,
)
from tests.test_tokens import forge as forge_token
from tests.wire import AUDIENCE, PREFIX, Device, Mqtt, decode_jwt, make_proof

DAY = 86400


@pytest.fixture(autouse=True)
def broker_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="iotauth")
    return caplog


def paired(server: Any, client_id: str = "thermo-1", key: ECKey | None = None) -> tuple[Device, dict[str, Any]]:
    dev = Device(server.mqtt_port, client_id, server.clock, key=key)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    assert tokens.get("token_type") == "DPoP", tokens
    return dev, tokens


def refused_at_connect(server: Any, caplog: pytest.LogCaptureFixture, client_id: str, password: str) -> str:
    """CONNECT with this password: asserts CONNACK 5 and returns the reason the broker logged."""
    caplog.clear()
    m = Mqtt(server.mqtt_port, client_id, username=client_id, password=password)
    try:
        assert m.connect() == 5
    finally:
        # not m.close(): after a refusal paho's loop thread sleeps a whole second before it can be joined;
        # once told to disconnect, it ends by itself (a daemon thread)
        m.client.disconnect()
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CONNECT refused")]
    assert len(reasons) == 1, reasons
    return reasons[0]


def password_for(token: str, key: ECKey, now: float, **kw: Any) -> str:
    return f"{token} {make_proof(key, 'CONNECT', AUDIENCE, iat=now, token=token, **kw)}"


# -- DPoP and tokens -------------------------------------------------------------------------------------

def test_D1_a_bound_token_needs_a_proof_with_its_ath_by_its_key(server, broker_log):
    dev, tokens = paired(server)
    other, other_tokens = paired(server, "lamp-1")
    at, now = tokens["access_token"], server.clock.now()
    cases = {
        "bare token": (at, "password lacks the DPoP proof"),
        "proof without ath": (f"{at} {forge_proof(now, key=dev.key, htm='CONNECT', htu=AUDIENCE)}",
                              "ath does not match the access token"),
        "ath of another token": (f"{at} {dev.connect_proof(other_tokens['access_token'])}",
                                 "ath does not match the access token"),
        "proof by another key": (password_for(at, other.key, now), "proof key is not the token's cnf.jkt"),
    }
    for name, (password, reason) in cases.items():
        assert reason in refused_at_connect(server, broker_log, "thermo-1", password), name
    assert dev.session(at).connack == 0  # the same token with a proper proof
    dev.close()
    other.close()


def test_D2_proof_headers_alg_none_hs256_wrong_typ_private_jwk_are_refused(server, broker_log):
    dev, tokens = paired(server)
    at, now = tokens["access_token"], server.clock.now()
    x = dev.key.as_dict(private=False)["x"].encode()
    headers = {
        "alg none": ({"alg": "none"}, lambda si: ""),
        "alg HS256 keyed with the jwk": ({"alg": "HS256"}, hs256_with(x)),
        "typ JWT": ({"typ": "JWT"}, None),
        "jwk with d": ({"jwk": dev.key.as_dict(private=True)}, None),
    }
    for name, (header, signer) in headers.items():
        request = forge_proof(now, key=dev.key, htu=f"{PREFIX}/token", header=header, signer=signer)
        reply = dev.refresh(tokens["refresh_token"], dpop=request)
        assert reply["error"] == "invalid_dpop_proof", name
        connect = forge_proof(now, key=dev.key, htm="CONNECT", htu=AUDIENCE, header=header, signer=signer,
                              claims={"ath": ath_of(at)})
        assert "CONNECT proof refused" in refused_at_connect(server, broker_log, "thermo-1", f"{at} {connect}")
    assert dev.refresh(tokens["refresh_token"])["token_type"] == "DPoP"  # none of them used the token up
    dev.close()


def test_D3_replay_and_time_window_and_made_up_nonce(server, broker_log):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    now = server.clock.now()
    once = dev.proof("device_authorization")
    assert "user_code" in dev.request("device_authorization", dpop=once)
    assert dev.request("device_authorization", dpop=once)["error"] == "invalid_dpop_proof"
    for offset in (-61, 61):
        assert dev.request("device_authorization", dpop=dev.proof("device_authorization", iat=now + offset))[
            "error"] == "use_dpop_nonce"
        with_nonce = dev.proof("device_authorization", iat=now + offset, nonce=dev.nonce)
        assert "user_code" in dev.request("device_authorization", dpop=with_nonce)
    made_up = dev.request("device_authorization",
                          dpop=dev.proof("device_authorization", nonce=base64.urlsafe_b64encode(b"\0" * 24).decode()))
    assert made_up["error"] == "use_dpop_nonce"
    assert made_up["dpop_nonce"] == server.call(server.service.current_nonce, server.clock.now())
    assert "user_code" in dev.request("device_authorization",
                                      dpop=dev.proof("device_authorization", nonce=made_up["dpop_nonce"]))
    # at the broker: a CONNECT proof replayed
    auth = dev.authorize()
    server.approve(auth["user_code"])
    at = dev.poll(auth["device_code"])["access_token"]
    password = f"{at} {dev.connect_proof(at)}"
    assert dev.session(at, password=password).connack == 0
    assert "jti replay" in refused_at_connect(server, broker_log, "thermo-1", password)
    dev.close()


def test_D4_the_binding_is_the_rfc7638_thumbprint_whatever_member_order_and_extras(server):
    assert jwk_thumbprint(RFC7638_RSA) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    reordered = {"crv": RFC9449_EC["crv"], "y": RFC9449_EC["y"], "kid": "k1", "use": "sig",
                 "x": RFC9449_EC["x"], "kty": "EC"}
    assert jwk_thumbprint(reordered) == RFC9449_JKT
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    public = dev.key.as_dict(private=False)
    required = {m: public[m] for m in ("crv", "kty", "x", "y")}
    expected = base64.urlsafe_b64encode(hashlib.sha256(
        json.dumps(required, separators=(",", ":"), sort_keys=True).encode()).digest()).rstrip(b"=").decode()
    with_extras = {"use": "sig", "kid": "device-key", **dict(reversed(list(public.items())))}
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"], dpop=dev.proof("token", header={"jwk": with_extras}))
    at = tokens["access_token"]
    assert decode_jwt(at)[1]["cnf"] == {"jkt": expected}
    assert dev.session(at).connack == 0  # a proof whose jwk has no extras, in another order: the same key
    dev.close()


def test_D5_ath_is_unpadded_base64url_of_sha256_of_the_ascii_token(server, broker_log):
    assert ath_of("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    dev, tokens = paired(server)
    at, now = tokens["access_token"], server.clock.now()
    digest = hashlib.sha256(at.encode()).digest()
    for wrong in (base64.urlsafe_b64encode(digest).decode(), digest.hex()):  # padded; hex
        proof = forge_proof(now, key=dev.key, htm="CONNECT", htu=AUDIENCE, claims={"ath": wrong})
        assert "ath does not match" in refused_at_connect(server, broker_log, "thermo-1", f"{at} {proof}")
    assert dev.session(at).connack == 0
    dev.close()


def token_refusals(server: Any, caplog: pytest.LogCaptureFixture, build: dict[str, Any], reason: str) -> None:
    """Each forged token at CONNECT, with a valid proof by the key its cnf names: CONNACK 5 for `reason`."""
    svc, now = server.service, server.clock.now()
    for name, make in build.items():
        token = make(svc, now)
        got = refused_at_connect(server, caplog, "lamp-1", password_for(token, DEVICE, now))
        assert f"access token refused: {reason}" in got, (name, got)


def test_J1_only_the_services_own_keys_verify_an_access_token(server, broker_log):
    token_refusals(server, broker_log, {
        "attacker key embedded as jwk, kid of that key": lambda s, n: forge_token(
            s, n, header={"jwk": ATTACKER.as_dict(private=False), "kid": ATTACKER.thumbprint()},
            signer=es256_by(ATTACKER)),
        "attacker key embedded as jwk, no kid": lambda s, n: forge_token(
            s, n, header={"jwk": ATTACKER.as_dict(private=False)}, drop=("kid",), signer=es256_by(ATTACKER)),
    }, "kid is not one of the service's keys")
    token_refusals(server, broker_log, {
        "real kid, foreign signature": lambda s, n: forge_token(s, n, signer=es256_by(ATTACKER)),
        "real kid, jku and x5u to the attacker": lambda s, n: forge_token(
            s, n, header={"jku": "http://evil.example/jwks", "x5u": "http://evil.example/c.pem"},
            signer=es256_by(ATTACKER)),
    }, "signature does not verify")


def test_J2_hs256_with_the_public_key_and_alg_none_are_refused(server, broker_log):
    token_refusals(server, broker_log, {
        "HS256 keyed with the PEM": lambda s, n: forge_token(s, n, header={"alg": "HS256"},
                                                              signer=hs256_by(public_pem(s))),
        "HS256 keyed with the JWK JSON": lambda s, n: forge_token(s, n, header={"alg": "HS256"},
                                                                  signer=hs256_by(public_jwk_json(s))),
    }, "alg 'HS256' is not allowed")
    token_refusals(server, broker_log, {"alg none": lambda s, n: forge_token(s, n, header={"alg": "none"},
                                                                            signer=unsigned)},
                   "alg 'none' is not allowed")
    token_refusals(server, broker_log, {"alg NONE": lambda s, n: forge_token(s, n, header={"alg": "NONE"},
                                                                            signer=unsigned)},
                   "alg 'NONE' is not allowed")


def test_J3_the_issuer_must_match_exactly(server, broker_log):
    issuer = server.service.settings.issuer
    token_refusals(server, broker_log, {
        name: (lambda iss: lambda s, n: forge_token(s, n, claims={"iss": iss}))(iss)
        for name, iss in {"http": "http", "a prefix": issuer[:-1], "a suffix /": issuer + "/",
                          "<issuer>.evil": issuer + ".evil"}.items()
    }, "iss does not match")


def test_J4_time_claims_are_json_numbers_and_typ_is_at_jwt(server, broker_log):
    token_refusals(server, broker_log, {
        name: (lambda exp: lambda s, n: forge_token(s, n, claims={"exp": exp}))(exp)
        for name, exp in {'"0"': "0", "null": None, "true": True, "numeric string": "9999999999"}.items()
    } | {"missing": lambda s, n: forge_token(s, n, drop=("exp",))}, "exp must be a JSON number")
    token_refusals(server, broker_log, {"a DPoP proof": lambda s, n: make_proof(DEVICE, "CONNECT", AUDIENCE, iat=n)},
                   "typ 'dpop+jwt' is not at+jwt")
    token_refusals(server, broker_log, {"typ JWT, signed by the service": lambda s, n: forge_token(
        s, n, header={"typ": "JWT"})}, "typ 'JWT' is not at+jwt")


# -- Refresh tokens -------------------------------------------------------------------------------------

def test_R1_twenty_concurrent_refreshes_leave_at_most_one_working_successor(svc, clock, settings):
    """Real threads, each with its own service and connection to the real SQLite file, like 20 processes."""
    key, thief = ECKey.generate_key("P-256", private=True), ECKey.generate_key("P-256", private=True)
    auth = svc.handle("device_authorization", {"client_id": "thermo-1"}, clock.now())
    svc.decide(auth["user_code"], "alice", True, clock.now())
    rt0 = svc.handle("token", {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": "thermo-1",
                               "device_code": auth["device_code"],
                               "dpop": make_proof(key, "PUBLISH", f"{PREFIX}/token", iat=clock.now())},
                     clock.now())["refresh_token"]
    assert [r.get("error") for r in refresh_in_threads(settings, rt0, clock.now(), thief)] == ["invalid_grant"] * 20
    results = refresh_in_threads(settings, rt0, clock.now(), key)
    successors = {r.get("refresh_token") for r in results}
    assert len(successors) == 1 and None not in successors, results  # within grace: all the same successor
    clock.advance(svc.settings.refresh_grace + 1)
    (rt1,) = successors
    nonce = svc.current_nonce(clock.now())
    works = svc.handle("token", {"grant_type": "refresh_token", "refresh_token": rt1, "client_id": "thermo-1",
                                 "dpop": make_proof(key, "PUBLISH", f"{PREFIX}/token", iat=0, nonce=nonce)},
                       clock.now())
    assert works["token_type"] == "DPoP"


def test_R2_reuse_after_grace_revokes_the_grant_and_closes_the_live_session(server):
    dev, tokens = paired(server)
    session = dev.session(tokens["access_token"])  # the first access token of the grant
    assert session.connack == 0
    rt1 = dev.refresh(tokens["refresh_token"])["refresh_token"]
    server.clock.advance(server.service.settings.refresh_grace + 1)
    assert dev.refresh(tokens["refresh_token"]) | {"dpop_nonce": None} == {
        "error": "invalid_grant", "dpop_nonce": None,
        "error_description": "The refresh token was already used; the grant has been revoked"}
    assert session.disconnected.wait(1.5), "live session still open after refresh-token reuse"
    assert dev.refresh(rt1)["error"] == "invalid_grant"
    dev.close()


def test_R3_idle_life_is_180_days_from_the_last_use(server):
    t0 = server.clock.now()
    devices = {cid: paired(server, cid) for cid in ("thermo-1", "lamp-1", "lamp-2")}
    rts = {cid: tokens["refresh_token"] for cid, (_, tokens) in devices.items()}
    expired = {"error": "invalid_grant", "error_description": "The refresh token has expired"}

    def refresh(cid: str) -> dict[str, Any]:
        reply = devices[cid][0].refresh(rts[cid])
        reply.pop("dpop_nonce")
        return reply

    server.clock.set(t0 + 179 * DAY)
    for cid in ("thermo-1", "lamp-1"):
        rts[cid] = refresh(cid)["refresh_token"]  # used at day 179
    server.clock.set(t0 + 180 * DAY + 1)
    assert refresh("lamp-2") == expired  # never used: 180 days + 1 s
    server.clock.set(t0 + 300 * DAY)
    assert refresh("thermo-1")["token_type"] == "DPoP"  # the day-179 successor at day 300
    server.clock.set(t0 + 359 * DAY + 1)
    assert refresh("lamp-1") == expired  # the day-179 successor, unused, at day 359 + 1 s
    for dev, _ in devices.values():
        dev.close()
