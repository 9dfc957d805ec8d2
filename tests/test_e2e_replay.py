"""DPoP replay on real sockets (protocol.md section 4): one jti memory for the broker and the service, and no
replay across a restart of the server, with or without a nonce in the proof.

Beside test_e2e.py's test_nonces_and_proofs_from_before_a_restart_are_not_accepted_after_it, which covers
nonce-bearing proofs; these cover proofs without a nonce (a device with a clock) and CONNECT.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import start_server
from tests.wire import Device


def paired(server: Any, client_id: str = "thermo-1") -> tuple[Device, dict[str, Any]]:
    dev = Device(server.mqtt_port, client_id, server.clock)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    assert tokens.get("token_type") == "DPoP", tokens
    return dev, tokens


def test_a_jti_used_on_a_request_is_refused_at_connect_and_vice_versa(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"], dpop=dev.proof("token", jti="used-by-the-service"))
    at = tokens["access_token"]
    # the service accepted a proof with this jti: the broker refuses a CONNECT proof reusing it
    assert dev.session(at, password=f"{at} {dev.connect_proof(at, jti='used-by-the-service')}").connack == 5
    assert dev.session(at, password=f"{at} {dev.connect_proof(at, jti='used-by-the-broker')}").connack == 0
    # the broker accepted a proof with this jti: the service refuses a request proof reusing it
    reply = dev.refresh(tokens["refresh_token"], dpop=dev.proof("token", jti="used-by-the-broker"))
    assert reply["error"] == "invalid_dpop_proof"
    assert reply["dpop_nonce"] == server.call(server.service.current_nonce, server.clock.now())
    assert dev.refresh(tokens["refresh_token"])["token_type"] == "DPoP"  # the refused request changed nothing
    dev.close()


# the issuer follows the HTTP port, which port 0 picks anew at each start: fix it, so tokens survive the restart
FIXED_ISSUER = '[http]\nissuer = "http://localhost:8080"\n'


def test_nonce_less_proofs_from_before_a_restart_are_not_accepted_after_it(settings, clock, caplog):
    first = start_server(settings, clock, FIXED_ISSUER)
    try:
        dev, tokens = paired(first)
        at = tokens["access_token"]
        # a device whose clock is 60 s fast: its proofs stay acceptable for two minutes
        request_proof = dev.proof("device_authorization", iat=clock.now() + 60)
        assert "user_code" in dev.request("device_authorization", dpop=request_proof)
        connect_password = f"{at} {dev.connect_proof(at, iat=clock.now() + 60)}"
        assert dev.session(at, password=connect_password).connack == 0
        dev.close()
    finally:
        first.stop()
    clock.advance(30)  # restarted well within the acceptance window of both proofs (until iat + 60 s)
    second = start_server(settings, clock, FIXED_ISSUER)
    try:
        again = Device(second.mqtt_port, "thermo-1", clock, key=dev.key)
        replayed = again.request("device_authorization", dpop=request_proof)
        assert replayed["error"] == "use_dpop_nonce"
        caplog.clear()
        assert again.session(at, password=connect_password).connack == 5
        assert "CONNECT proof refused: no-nonce proof from before the server restart" in caplog.text
        # a device recovers as it would from any use_dpop_nonce: a new proof carrying the nonce
        assert "user_code" in again.request("device_authorization",
                                            dpop=again.proof("device_authorization", nonce=replayed["dpop_nonce"]))
        assert again.session(at, password=f"{at} {again.connect_proof(at, nonce=again.nonce)}").connack == 0
        # once no proof the first process saw can still be accepted, a nonce-less proof works again
        clock.advance(3 * 60)
        assert "user_code" in again.request("device_authorization", dpop=True)
        again.close()
    finally:
        second.stop()


def test_a_first_start_accepts_nonce_less_proofs_at_once(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    assert "user_code" in dev.request("device_authorization", dpop=True)
    dev.close()
