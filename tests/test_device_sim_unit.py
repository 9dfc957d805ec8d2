"""Unit tests of device_sim that need no broker and no service.

The simulator is an honest client: it is tested against the RFC vectors and a
tiny fake responder, never against the project's own authsvc or broker code.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey
from typer.testing import CliRunner

import device_sim
from device_sim import cli, events
from device_sim.device import Device
from device_sim.errors import PairingError, ProtocolViolation, RequestTimeout, ServiceError, StateError
from device_sim.events import DeviceEvent, EventRecorder
from device_sim.flow import (
    DEVICE_CODE_GRANT,
    backoff_delay,
    next_poll_interval,
    parse_device_authorization,
    parse_token_response,
    refresh_delay,
)
from device_sim.proofs import (
    access_token_hash,
    b64url,
    connect_proof,
    generate_key,
    jwk_thumbprint,
    private_jwk,
    public_jwk,
    publish_proof,
)
from device_sim.requests import Requester, new_reply_topic
from device_sim.roles import parse_power_command
from device_sim.sealed_state import (
    DIR_ENV,
    KEY_ENV,
    DeviceState,
    MemoryStore,
    SealedStore,
    default_state_path,
    key_file_for,
)
from device_sim.session import bootstrap_client_id

NOW = 1_700_000_000.0
RFC9449_KEY = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
               "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
RFC7638_RSA_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK"
         "RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicA"
         "taSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XP"
         "ksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
}


def verify_with_own_jwk(proof: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a server does first: verify the proof with the key in its own header, ES256 only."""
    header = jws.extract_compact(proof.encode()).headers()
    token = jwt.decode(proof, ECKey.import_key(header["jwk"]), algorithms=["ES256"])
    return dict(token.header), dict(token.claims)


# -- sealed state ---------------------------------------------------------------

def sample_state(refresh_token: str | None = "rt-secret") -> DeviceState:
    return DeviceState(client_id="thermo-1", private_jwk=private_jwk(generate_key()),
                       refresh_token=refresh_token, dpop_nonce="n1", scope="write:temperature")


def test_sealed_state_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    store = SealedStore.open(path, env={})
    state = sample_state()
    store.save(state)
    assert SealedStore.open(path, env={}).load() == state


def test_missing_state_file_loads_as_none(tmp_path: Path) -> None:
    assert SealedStore.open(tmp_path / "none.state", env={}).load() is None


def test_state_and_key_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "thermo-1.state"
    SealedStore.open(path, env={}).save(sample_state())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file_for(path).stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # and no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["thermo-1.state", "thermo-1.state.key"]


def test_secrets_are_not_stored_in_the_clear(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    state = sample_state()
    SealedStore.open(path, env={}).save(state)
    blob = path.read_bytes()
    assert b"rt-secret" not in blob
    assert state.private_jwk["d"].encode() not in blob
    assert "rt-secret" not in repr(state) and state.private_jwk["d"] not in repr(state)


def test_key_from_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    env = {KEY_ENV: b64url(secrets.token_bytes(32))}
    SealedStore.open(path, env=env).save(sample_state())
    assert not key_file_for(path).exists()
    assert SealedStore.open(path, env=env).load() is not None


def test_wrong_key_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    SealedStore.open(path, env={}).save(sample_state())
    with pytest.raises(StateError, match=re.escape(str(path)) + ".*wrong key"):
        SealedStore.open(path, env={KEY_ENV: b64url(secrets.token_bytes(32))}).load()


def test_tampered_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    store = SealedStore.open(path, env={})
    store.save(sample_state())
    envelope = json.loads(path.read_bytes())
    ciphertext = envelope["ciphertext"]
    envelope["ciphertext"] = ("A" if ciphertext[0] != "A" else "B") + ciphertext[1:]
    path.write_text(json.dumps(envelope))
    with pytest.raises(StateError, match=re.escape(str(path)) + ".*modified"):
        store.load()


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"format": "other"}',
                                     b'{"format": "iotauth-device-state", "version": 1}'])
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "thermo-1.state"
    store = SealedStore.open(path, env={})
    path.write_bytes(content)
    with pytest.raises(StateError, match=re.escape(str(path))):
        store.load()


def test_missing_key_file_next_to_a_state_file_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    SealedStore.open(path, env={}).save(sample_state())
    key_file_for(path).unlink()
    with pytest.raises(StateError, match="key is missing"):
        SealedStore.open(path, env={})
    assert not key_file_for(path).exists()


@pytest.mark.parametrize("value", ["short", "!!!notbase64url!!!", "A" * 44])
def test_malformed_key_variable_is_named(tmp_path: Path, value: str) -> None:
    with pytest.raises(StateError, match=KEY_ENV):
        SealedStore.open(tmp_path / "x.state", env={KEY_ENV: value})


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "thermo-1.state"
    SealedStore.open(path, env={})
    os.chmod(key_file_for(path), 0o644)
    with pytest.raises(StateError, match="readable by others"):
        SealedStore.open(path, env={})


def test_default_state_path_follows_the_directory_variable(tmp_path: Path) -> None:
    assert default_state_path("thermo-1", env={DIR_ENV: str(tmp_path)}) == tmp_path / "thermo-1.state"
    assert default_state_path("thermo-1", env={}).parts[-3:] == ("share", "iotauth-device", "thermo-1.state")
    with pytest.raises(ValueError):
        default_state_path("../etc/passwd", env={})


# -- proofs ---------------------------------------------------------------------

def test_publish_proof_verifies_with_its_own_public_jwk() -> None:
    key = generate_key()
    header, claims = verify_with_own_jwk(publish_proof(key, "oauth/v1/token", now=NOW))
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"}
    assert claims["htm"] == "PUBLISH" and claims["htu"] == "oauth/v1/token"
    assert claims["iat"] == int(NOW) and isinstance(claims["iat"], int)
    assert 0 < len(claims["jti"]) <= 64
    assert "ath" not in claims and "nonce" not in claims


def test_connect_proof_carries_ath_and_nonce() -> None:
    key = generate_key()
    proof = connect_proof(key, "mqtt://localhost:1883", "the.access.token", now=NOW, nonce="srv-nonce")
    _, claims = verify_with_own_jwk(proof)
    assert claims["htm"] == "CONNECT" and claims["htu"] == "mqtt://localhost:1883"
    assert claims["ath"] == access_token_hash("the.access.token")
    assert claims["nonce"] == "srv-nonce"


def test_proof_header_never_holds_private_members() -> None:
    key = generate_key()
    assert "d" in private_jwk(key)
    for proof in (publish_proof(key, "oauth/v1/token", now=NOW), connect_proof(key, "a", "t", now=NOW)):
        header, _ = verify_with_own_jwk(proof)
        assert "d" not in header["jwk"]
        assert header["jwk"] == public_jwk(key)


def test_every_proof_has_a_new_jti() -> None:
    key = generate_key()
    jtis = {verify_with_own_jwk(publish_proof(key, "t", now=NOW))[1]["jti"] for _ in range(20)}
    assert len(jtis) == 20


def test_ath_matches_the_rfc9449_example() -> None:
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


@pytest.mark.parametrize("jwk", [
    RFC9449_KEY,
    dict(reversed(list(RFC9449_KEY.items()))),
    {**RFC9449_KEY, "kid": "k1", "use": "sig"},
])
def test_thumbprint_of_the_rfc9449_example_key(jwk: dict[str, str]) -> None:
    assert jwk_thumbprint(jwk) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


def test_thumbprint_of_the_rfc7638_example_key() -> None:
    assert jwk_thumbprint(RFC7638_RSA_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_thumbprint_of_a_private_key_is_that_of_its_public_key() -> None:
    key = generate_key()
    assert jwk_thumbprint(private_jwk(key)) == jwk_thumbprint(public_jwk(key)) == key.thumbprint()


# -- honesty: no server code in the client ---------------------------------------

def test_no_device_sim_module_imports_authsvc_or_broker() -> None:
    package = Path(device_sim.__file__).parent
    offenders = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{source.name}: {n}" for n in names if n.split(".")[0] in ("authsvc", "broker")]
    assert offenders == []
    assert len(list(package.glob("*.py"))) >= 8


# -- request/response helper ------------------------------------------------------

class FakeResponder:
    """Answers requests published through it, in the caller's thread (like a service would)."""

    def __init__(self, answers: list[dict[str, Any] | None] | None = None, nonce: str = "nonce-1") -> None:
        self.answers = answers or []
        self.nonce = nonce
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.requester: Requester | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        request = json.loads(payload)
        self.requests.append((topic, request))
        answer = self.answers.pop(0) if self.answers else {}
        if answer is None:
            return  # never answers
        response = {**answer, "correlation_id": request["correlation_id"], "dpop_nonce": self.nonce}
        assert self.requester is not None and request["reply_to"] == self.requester.reply_topic
        self.requester.deliver(b'{"correlation_id": "someone-else", "error": "x"}')  # ignored
        self.requester.deliver(b"not json")  # ignored
        self.requester.deliver(json.dumps(response).encode())


def make_requester(responder: FakeResponder, **kwargs: Any) -> Requester:
    requester = Requester(responder.publish, new_reply_topic(), **kwargs)
    responder.requester = requester
    return requester


def test_request_carries_reply_to_and_correlation_id_and_cleans_up() -> None:
    responder = FakeResponder([{"device_code": "dc"}])
    requester = make_requester(responder)
    response = requester.request("device_authorization", {"client_id": "thermo-1", "scope": "s"})
    assert response["device_code"] == "dc"
    topic, request = responder.requests[0]
    assert topic == "oauth/v1/device_authorization"
    assert request["client_id"] == "thermo-1" and request["reply_to"] == requester.reply_topic
    assert 0 < len(request["correlation_id"]) <= 64
    assert requester.pending_count == 0


def test_request_timeout_removes_the_pending_slot() -> None:
    requester = make_requester(FakeResponder([None]))
    with pytest.raises(RequestTimeout, match="oauth/v1/token"):
        requester.request("token", {"grant_type": "x"}, timeout=0.05)
    assert requester.pending_count == 0


def test_failing_publish_removes_the_pending_slot() -> None:
    def publish(topic: str, payload: bytes) -> None:
        raise ConnectionError("not connected")
    requester = Requester(publish, new_reply_topic())
    with pytest.raises(ConnectionError):
        requester.request("token", {})
    assert requester.pending_count == 0


def test_fail_all_wakes_a_waiting_call_and_cleans_up() -> None:
    requester = make_requester(FakeResponder([None]))
    failure: list[BaseException] = []

    def call() -> None:
        try:
            requester.request("token", {}, timeout=30)
        except BaseException as exc:
            failure.append(exc)
    thread = threading.Thread(target=call)
    thread.start()
    while requester.pending_count == 0:
        threading.Event().wait(0.001)
    requester.fail_all(ConnectionError("session lost"))
    thread.join(5)
    assert isinstance(failure[0], ConnectionError) and requester.pending_count == 0


def test_error_response_raises_service_error_with_the_wire_code() -> None:
    requester = make_requester(FakeResponder([{"error": "invalid_grant", "error_description": "unknown"}]))
    with pytest.raises(ServiceError) as caught:
        requester.request("token", {})
    assert caught.value.error == "invalid_grant" and caught.value.description == "unknown"


def test_every_response_nonce_is_reported() -> None:
    seen: list[str] = []
    responder = FakeResponder([{"error": "authorization_pending"}, {}], nonce="n-7")
    requester = make_requester(responder, on_nonce=seen.append)
    with pytest.raises(ServiceError):
        requester.request("token", {})
    requester.request("revoke", {})
    assert seen == ["n-7", "n-7"]


def test_use_dpop_nonce_is_retried_once_with_the_fresh_nonce_and_a_new_jti() -> None:
    key = generate_key()
    nonce: list[str] = []
    responder = FakeResponder([{"error": "use_dpop_nonce"}, {"access_token": "at"}], nonce="fresh")
    requester = make_requester(responder, on_nonce=nonce.append)

    def proof(topic: str) -> str:
        return publish_proof(key, topic, now=NOW, nonce=nonce[-1] if nonce else None)
    assert requester.request("token", {"grant_type": "g"}, proof=proof) == {
        "access_token": "at", "correlation_id": responder.requests[1][1]["correlation_id"],
        "dpop_nonce": "fresh"}
    first, second = (verify_with_own_jwk(r["dpop"])[1] for _, r in responder.requests)
    assert "nonce" not in first and second["nonce"] == "fresh"
    assert first["jti"] != second["jti"]
    assert first["htu"] == second["htu"] == "oauth/v1/token"


def test_use_dpop_nonce_is_not_retried_twice() -> None:
    responder = FakeResponder([{"error": "use_dpop_nonce"}] * 3)
    requester = make_requester(responder)
    with pytest.raises(ServiceError, match="use_dpop_nonce"):
        requester.request("token", {}, proof=lambda topic: "proof")
    assert len(responder.requests) == 2


@pytest.mark.parametrize("topic", ["oauth/v1/reply/short", "oauth/v1/reply/" + "a" * 65,
                                   "oauth/v1/reply/" + "+" * 22, "other/reply/" + "a" * 32])
def test_reply_topics_must_be_unguessable_and_exact(topic: str) -> None:
    with pytest.raises(ValueError):
        Requester(lambda t, p: None, topic)


def test_new_reply_topic_has_at_least_128_random_bits() -> None:
    topics = {new_reply_topic() for _ in range(50)}
    assert len(topics) == 50
    for topic in topics:
        reply_id = topic.removeprefix("oauth/v1/reply/")
        assert len(reply_id) >= 22 and set(reply_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def test_bootstrap_client_ids_are_short_random_alphanumerics() -> None:
    ids = {bootstrap_client_id("smart-fridge.001") for _ in range(50)}
    assert len(ids) == 50
    for client_id in ids:
        assert client_id.isascii() and client_id.isalnum() and len(client_id) <= 23
        assert client_id.startswith("smartfriboot")


# -- pure scheduling and parsing --------------------------------------------------

@pytest.mark.parametrize(("interval", "error", "expected"), [
    (5, "authorization_pending", 5),
    (5, "slow_down", 10),
    (10, "slow_down", 15),
    (15, "authorization_pending", 15),
])
def test_poll_interval(interval: float, error: str, expected: float) -> None:
    assert next_poll_interval(interval, error) == expected


@pytest.mark.parametrize("error", ["access_denied", "expired_token", "invalid_grant"])
def test_terminal_errors_end_polling(error: str) -> None:
    with pytest.raises(ValueError):
        next_poll_interval(5, error)


@pytest.mark.parametrize(("expires_in", "delay"), [(900, 840), (300, 240), (100, 80), (10, 8)])
def test_refresh_a_minute_before_expiry_or_at_80_percent(expires_in: int, delay: float) -> None:
    assert refresh_delay(expires_in) == pytest.approx(delay)


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff_delay(n) for n in (1, 2, 3)] == [2, 4, 8]
    assert backoff_delay(20) == 60


@pytest.mark.parametrize(("payload", "command"), [
    (b"on", "on"), (b"OFF", "off"), (b" on\n", "on"), (b'{"power": "on"}', "on"),
    (b'{"power": "Off"}', "off"), (b"toggle", None), (b'{"power": 1}', None), (b"[1]", None),
    (b'{"state": "on"}', None), (b"\xff", None), (b"", None),
])
def test_power_commands(payload: bytes, command: str | None) -> None:
    assert parse_power_command(payload) == command


GOOD_TOKENS = {"access_token": "a.b.c", "token_type": "DPoP", "expires_in": 900,
               "refresh_token": "r", "scope": "write:temperature"}


@pytest.mark.parametrize("change", [
    {"token_type": "Bearer"}, {"access_token": "a b"}, {"expires_in": True}, {"expires_in": "900"},
    {"expires_in": 0}, {"refresh_token": None}, {"access_token": ""}, {"scope": 5},
])
def test_malformed_token_responses_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation):
        parse_token_response({**GOOD_TOKENS, **change}, "write:temperature", NOW)


def test_token_response_without_scope_means_the_requested_scope() -> None:
    response = {k: v for k, v in GOOD_TOKENS.items() if k != "scope"}
    tokens = parse_token_response(response, "device:power", NOW)
    assert tokens.scope == "device:power" and tokens.refresh_at == NOW + 840
    assert "a.b.c" not in repr(tokens)


def test_device_authorization_interval_defaults_to_five() -> None:
    code = parse_device_authorization({"device_code": "d", "user_code": "BCD234",
                                       "verification_uri": "http://x/activate", "expires_in": 600})
    assert code.interval == 5 and code.verification_uri_complete is None


# -- the device's flow against a fake service (no network) -------------------------

class FakeService:
    """Plays the service for Device.pair/refresh: verifies proofs, demands a nonce first."""

    NONCE = "srv-nonce"

    def __init__(self, polls: list[str]) -> None:
        self.polls = polls
        self.proof_keys: list[str] = []
        self.refresh_tokens: dict[str, str] = {}
        self.issued = 0
        self.requester: Requester | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        request = json.loads(payload)
        response = self.answer(topic, request)
        response.update(correlation_id=request["correlation_id"], dpop_nonce=self.NONCE)
        assert self.requester is not None
        self.requester.deliver(json.dumps(response).encode())

    def answer(self, topic: str, request: dict[str, Any]) -> dict[str, Any]:
        header, claims = verify_with_own_jwk(request["dpop"])
        assert claims["htm"] == "PUBLISH" and claims["htu"] == topic
        if claims.get("nonce") != self.NONCE:
            return {"error": "use_dpop_nonce"}
        jkt = jwk_thumbprint(header["jwk"])
        self.proof_keys.append(jkt)
        if topic.endswith("/device_authorization"):
            return {"device_code": "D" * 64, "user_code": "BCD234", "verification_uri": "http://localhost/activate",
                    "verification_uri_complete": "http://localhost/activate?user_code=BCD234",
                    "expires_in": 600, "interval": 5}
        if request["grant_type"] == DEVICE_CODE_GRANT:
            outcome = self.polls.pop(0)
            return self.issue(jkt) if outcome == "approve" else {"error": outcome}
        if self.refresh_tokens.pop(request["refresh_token"], None) != jkt:
            return {"error": "invalid_grant", "error_description": "unknown refresh token"}
        return self.issue(jkt)

    def issue(self, jkt: str) -> dict[str, Any]:
        self.issued += 1
        refresh_token = f"rt-{self.issued}"
        self.refresh_tokens[refresh_token] = jkt
        return {"access_token": f"at-{self.issued}", "token_type": "DPoP", "expires_in": 900,
                "scope": "write:temperature", "refresh_token": refresh_token}


class RecordingStore(MemoryStore):
    def __init__(self, journal: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.journal = journal

    def save(self, state: DeviceState) -> None:
        super().save(state)
        self.journal.append(("saved", state.refresh_token))


def offline_device(monkeypatch: pytest.MonkeyPatch, service: FakeService, **kwargs: Any
                   ) -> tuple[Device, list[float], EventRecorder]:
    """A Device whose requests go to ``service`` and whose waits are recorded, not slept."""
    recorder = EventRecorder()
    device = Device("thermo-1", "write:temperature", now=lambda: NOW, on_event=recorder, **kwargs)
    requester = Requester(service.publish, new_reply_topic(), on_nonce=device._remember_nonce)
    service.requester = requester
    waits: list[float] = []
    monkeypatch.setattr(device, "_requester", lambda: requester)
    monkeypatch.setattr(device, "_pause", waits.append)
    return device, waits, recorder


def test_pairing_honours_the_interval_and_slow_down(monkeypatch: pytest.MonkeyPatch) -> None:
    service = FakeService(["authorization_pending", "slow_down", "authorization_pending", "approve"])
    device, waits, recorder = offline_device(monkeypatch, service)
    tokens = device.pair()
    assert waits == [5, 5, 10, 10]
    assert [e.data["interval"] for e in recorder.events if e.name == events.POLLED] == [5, 10, 10]
    assert tokens.access_token == "at-1" and device.refresh_token == "rt-1"
    code = recorder.wait_for(events.CODE_SHOWN, 0).data
    assert code["user_code"] == "BCD234" and code["verification_uri_complete"].endswith("BCD234")
    assert "device_code" not in code


def test_device_code_is_bound_to_the_device_key(monkeypatch: pytest.MonkeyPatch) -> None:
    service = FakeService(["approve"])
    device, _, _ = offline_device(monkeypatch, service)
    device.pair()
    assert service.proof_keys == [device.thumbprint] * 2  # device_authorization and token
    assert device.dpop_nonce == FakeService.NONCE


@pytest.mark.parametrize(("error", "message"), [
    ("access_denied", "denied"),
    ("expired_token", "expired"),
    ("invalid_grant", "invalid_grant"),
])
def test_pairing_stops_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, error: str,
                                            message: str) -> None:
    service = FakeService(["authorization_pending", error])
    device, waits, _ = offline_device(monkeypatch, service)
    with pytest.raises(PairingError, match=message) as caught:
        device.pair()
    assert caught.value.error == error and waits == [5, 5]
    assert device.refresh_token is None


def test_refresh_saves_the_rotated_token_before_announcing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    journal: list[tuple[str, Any]] = []
    service = FakeService(["approve"])
    device, _, _ = offline_device(monkeypatch, service, store=RecordingStore(journal))
    device._on_event = lambda event: journal.append(("event", event.name))
    device.pair()
    journal.clear()
    tokens = device.refresh()
    assert tokens.refresh_token == "rt-2" and tokens.access_token == "at-2"
    assert journal.index(("saved", "rt-2")) < journal.index(("event", events.TOKENS_RECEIVED))
    assert "rt-1" not in service.refresh_tokens


def test_invalid_grant_on_refresh_forgets_the_refresh_token(monkeypatch: pytest.MonkeyPatch) -> None:
    service = FakeService(["approve"])
    device, _, recorder = offline_device(monkeypatch, service)
    device.pair()
    service.refresh_tokens.clear()  # the grant was revoked
    with pytest.raises(ServiceError, match="invalid_grant"):
        device.refresh()
    assert device.refresh_token is None and device.tokens is None
    assert recorder.wait_for(events.GRANT_LOST, 0).data["error"] == "invalid_grant"


def test_key_and_refresh_token_survive_a_restart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = SealedStore.open(tmp_path / "thermo-1.state", env={})
    service = FakeService(["approve"])
    device, _, _ = offline_device(monkeypatch, service, store=store)
    device.pair()
    reopened = SealedStore.open(tmp_path / "thermo-1.state", env={})
    again = Device("thermo-1", "write:temperature", store=reopened)
    assert again.thumbprint == device.thumbprint
    assert again.refresh_token == "rt-1" and again.dpop_nonce == FakeService.NONCE


def test_a_different_scope_drops_the_stored_grant_but_keeps_the_key() -> None:
    store = MemoryStore(sample_state())
    assert store.state is not None
    jkt = jwk_thumbprint(store.state.private_jwk)
    recorder = EventRecorder()
    device = Device("thermo-1", "device:power", store=store, on_event=recorder)
    assert device.thumbprint == jkt and device.refresh_token is None
    assert recorder.wait_for(events.GRANT_LOST, 0).data["error"] == "scope_changed"


def test_state_of_another_device_is_refused() -> None:
    with pytest.raises(StateError, match="thermo-1"):
        Device("lamp-1", "device:power", store=MemoryStore(sample_state())).load()


@pytest.mark.parametrize("client_id", ["", "+", "#", "a/lamp-2", "x" * 65, "lämp"])
def test_device_refuses_identities_outside_the_protocol_alphabet(client_id: str) -> None:
    with pytest.raises(ValueError):
        Device(client_id, "write:temperature")


def test_stop_from_an_event_callback_ends_run_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    service = FakeService(["authorization_pending"] * 5)
    recorder = EventRecorder()
    device = Device("thermo-1", "write:temperature", on_event=recorder)
    requester = Requester(service.publish, new_reply_topic(), on_nonce=device._remember_nonce)
    service.requester = requester
    monkeypatch.setattr(device, "_requester", lambda: requester)

    def on_event(event: DeviceEvent) -> None:
        recorder(event)
        if event.name == events.CODE_SHOWN:
            device.stop()
    device._on_event = on_event
    device.run()  # returns at once: the 5 s wait before the first poll sees the stop
    assert recorder.names()[-2:] == [events.CODE_SHOWN, events.STOPPED]
    assert recorder.events[-1].data == {"error": None}


@pytest.mark.parametrize(("target", "state"), [("+", "on"), ("lamp-1/#", "on"), ("lamp-1", "toggle")])
def test_power_commands_only_go_to_a_valid_device_and_state(target: str, state: str) -> None:
    with pytest.raises(ValueError):
        Device("panel-1", "control:power").send_power_command(target, state)


def test_stop_without_run_is_harmless() -> None:
    device = Device("thermo-1", "write:temperature")
    device.stop()
    device.stop()


# -- CLI --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["revoke", "--help"]])
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0 and "Usage" in result.output


def test_every_event_has_a_human_line() -> None:
    samples: dict[str, dict[str, Any]] = {
        events.KEY_READY: {"jkt": "j", "created": True},
        events.CODE_SHOWN: {"user_code": "BCD234", "verification_uri": "u", "verification_uri_complete": None,
                            "expires_in": 600, "interval": 5},
        events.POLLED: {"error": "slow_down", "interval": 10.0},
        events.TOKENS_RECEIVED: {"grant_type": "refresh_token", "scope": "s", "expires_in": 900},
        events.CONNECTED: {"client_id": "c", "host": "h", "port": 1, "scope": "s"},
        events.SUBSCRIBED: {"topic": "t", "qos": 1},
        events.PUBLISHED: {"topic": "t", "payload": {"celsius": 21.4}},
        events.RECEIVED: {"topic": "t", "payload": "on"},
        events.POWER: {"state": "on"},
        events.REFUSED: {"what": "connect", "code": 5, "reason": "not authorized"},
        events.DISCONNECTED: {"reason": "lost", "detail": "connection lost"},
        events.GRANT_LOST: {"error": "invalid_grant", "description": ""},
        events.ERROR: {"message": "m", "retry_in": 2.0},
        events.STOPPED: {"error": None},
    }
    names = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)}
    assert names == set(samples)
    for name, data in samples.items():
        line = cli.describe(DeviceEvent(name, data))
        assert line and "\n" not in line and not line.startswith(name + " {")
    assert "not authorized" in cli.describe(DeviceEvent(events.REFUSED, samples[events.REFUSED]))


@pytest.mark.parametrize(("error", "busy"), [("temporarily_unavailable", True), ("server_error", True),
                                             ("invalid_grant", False), ("access_denied", False)])
def test_busy_service_errors_are_told_apart_so_the_device_retries_them(error: str, busy: bool) -> None:
    from device_sim.errors import ServiceBusy, ServiceError

    requester = make_requester(FakeResponder([{"error": error, "error_description": "d"}]))
    with pytest.raises(ServiceError) as raised:
        requester.request("token", {"grant_type": "refresh_token"})
    assert isinstance(raised.value, ServiceBusy) is busy
    assert raised.value.error == error
