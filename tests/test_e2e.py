"""End to end on real sockets: pair over MQTT, approve, CONNECT with a DPoP-bound token, scopes enforced."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import httpx
from typer.testing import CliRunner

from authsvc.cli import app
from tests.wire import AUDIENCE, Device, Mqtt, decode_jwt

runner = CliRunner()


def paired(server: Any, client_id: str, scope: str | None = None) -> tuple[Device, dict[str, Any]]:
    dev = Device(server.mqtt_port, client_id, server.clock)
    auth = dev.authorize(scope)
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    assert tokens.get("token_type") == "DPoP", tokens
    return dev, tokens


def test_device_authorization_reply_has_every_rfc8628_field(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    reply = dev.request("device_authorization", correlation_id="c-1")
    assert len(reply["device_code"]) == 64
    assert len(reply["user_code"]) == 6 and reply["user_code"][:3].isalpha() and reply["user_code"][3:].isdigit()
    assert reply["verification_uri"] == f"{server.service.settings.issuer}/activate"
    assert reply["verification_uri_complete"] == f"{reply['verification_uri']}?user_code={reply['user_code']}"
    assert (reply["expires_in"], reply["interval"]) == (600, 5)
    assert reply["correlation_id"] == "c-1" and reply["dpop_nonce"]


def test_pending_then_slow_down_then_cli_approval_then_tokens(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = dev.authorize()
    assert dev.poll(auth["device_code"])["error"] == "authorization_pending"
    server.clock.advance(2)
    assert dev.poll(auth["device_code"])["error"] == "slow_down"
    server.clock.advance(10)
    assert dev.poll(auth["device_code"])["error"] == "authorization_pending"
    result = runner.invoke(app, ["approve", auth["user_code"].lower(), "--data-dir",
                                 str(server.settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert "approved" in result.output
    server.clock.advance(1)  # approved: tokens whatever the timing
    tokens = dev.poll(auth["device_code"])
    assert tokens["token_type"] == "DPoP" and tokens["expires_in"] == 900
    assert tokens["scope"] == "write:temperature device:power"
    assert len(tokens["refresh_token"]) >= 43
    assert dev.poll(auth["device_code"])["error"] == "invalid_grant"  # single use


def test_access_token_claims_follow_rfc9068(server):
    dev, tokens = paired(server, "thermo-1")
    header, claims = decode_jwt(tokens["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"]
    jwks = httpx.get(f"{server.http_url}/.well-known/jwks.json").json()
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    assert all("d" not in k for k in jwks["keys"])
    assert claims["iss"] == server.service.settings.issuer
    assert claims["sub"] == "admin" and claims["aud"] == AUDIENCE and claims["client_id"] == "thermo-1"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["cnf"] == {"jkt": dev.key.thumbprint()}
    assert claims["scope"] == "write:temperature device:power" and claims["jti"]


def test_metadata_names_the_mqtt_topics_and_audience(server):
    meta = httpx.get(f"{server.http_url}/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == server.service.settings.issuer
    assert meta["jwks_uri"] == f"{meta['issuer']}/.well-known/jwks.json"
    assert meta["dpop_signing_alg_values_supported"] == ["ES256"]
    assert meta["mqtt_token_topic"] == "oauth/v1/token"
    assert meta["mqtt_device_authorization_topic"] == "oauth/v1/device_authorization"
    assert meta["mqtt_revoke_topic"] == "oauth/v1/revoke"
    assert meta["mqtt_jwks_topic"] == "oauth/v1/jwks"
    assert meta["mqtt_broker_audience"] == AUDIENCE
    assert meta["response_types_supported"] == []  # REQUIRED by RFC 8414; no authorization endpoint


def test_jwks_is_retained_on_the_jwks_topic(server):
    m = Mqtt(server.mqtt_port, "jwkswatcher")
    assert m.connect() == 0
    m.subscribe("oauth/v1/jwks")
    (payload,) = m.wait_message("oauth/v1/jwks")[:1]
    assert json.loads(payload) == server.service.keys.jwks()
    m.close()


def test_connect_accepted_and_scopes_enforced_between_two_devices(server):
    thermo, t_tokens = paired(server, "thermo-1")
    panel, p_tokens = paired(server, "panel-1")
    t = thermo.session(t_tokens["access_token"])
    p = panel.session(p_tokens["access_token"])
    assert (t.connack, p.connack) == (0, 0)
    assert p.subscribe("home/#", "home/+/temperature", "#") == [0x80, 1, 0x80]
    assert t.subscribe("home/thermo-1/power/set", "home/panel-1/power/set") == [1, 0x80]
    t.publish("home/thermo-1/temperature", b'{"celsius": 21.5}')
    assert p.wait_message("home/thermo-1/temperature")
    p.publish("home/thermo-1/power/set", b"off")
    assert t.wait_message("home/thermo-1/power/set") == [b"off"]
    # outside the thermostat's scopes: dropped, the session stays usable
    t.publish("home/panel-1/temperature", b'{"celsius": 99}')
    t.publish("home/thermo-1/power/set", b"on")  # only control:power may command
    t.publish("home/thermo-1/temperature", b'{"celsius": 22.0}')
    temps = p.wait_message("home/thermo-1/temperature", count=2)
    assert [json.loads(x)["celsius"] for x in temps] == [21.5, 22.0]
    assert p.received("home/panel-1/temperature") == []
    assert t.received("home/thermo-1/power/set") == [b"off"]


def test_connect_refused_cases(server):
    thermo, tokens = paired(server, "thermo-1")
    at = tokens["access_token"]
    assert thermo.session(at, password=at).connack == 5  # token without proof (D1)
    assert thermo.session(at, password=f"{at} {thermo.connect_proof(at, htu='mqtt://evil:1883')}").connack == 5
    assert thermo.session(at, client_id="lamp-1").connack == 5  # token of thermo-1 under another ClientId
    assert thermo.session(at, username="panel-1").connack == 5
    other = Device(server.mqtt_port, "thermo-1", server.clock)
    assert thermo.session(at, password=f"{at} {other.connect_proof(at)}").connack == 5  # proof by another key
    proof = thermo.connect_proof(at)
    assert thermo.session(at, password=f"{at} {proof}").connack == 0
    assert thermo.session(at, password=f"{at} {proof}", client_id="thermo-1").connack == 5  # replayed jti
    server.clock.advance(901)
    assert thermo.session(at).connack == 5  # expired


def test_bootstrap_session_is_limited_to_protocol_topics(server):
    m = Mqtt(server.mqtt_port, "bootonly")
    assert m.connect() == 0
    assert m.subscribe("home/+/temperature", "#", "oauth/v1/token", "oauth/#",
                       "oauth/v1/reply/AAAAAAAAAAAAAAAAAAAAAAAA") == [0x80, 0x80, 0x80, 0x80, 1]
    m.close()


def test_refresh_rotates_and_reconnect_works(server):
    thermo, tokens = paired(server, "thermo-1")
    server.clock.advance(800)
    new = thermo.refresh(tokens["refresh_token"])
    assert new["token_type"] == "DPoP" and new["refresh_token"] != tokens["refresh_token"]
    server.clock.advance(200)  # the first access token has expired now
    assert thermo.session(tokens["access_token"]).connack == 5
    assert thermo.session(new["access_token"]).connack == 0
    newer = thermo.refresh(new["refresh_token"])
    assert newer["token_type"] == "DPoP"


def test_cli_revoke_disconnects_live_session(server):
    thermo, tokens = paired(server, "thermo-1")
    s = thermo.session(tokens["access_token"])
    assert s.connack == 0
    result = subprocess.run([sys.executable, "-m", "authsvc", "revoke", "--client", "thermo-1", "--data-dir",
                             str(server.settings.data_dir)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert (result.stdout.strip(), result.stderr) == ("revoked 1 grant(s) of thermo-1", "")  # no stray log lines
    assert s.disconnected.wait(1.5), "session still open after revoke"
    assert thermo.refresh(tokens["refresh_token"])["error"] == "invalid_grant"
    assert thermo.session(tokens["access_token"]).connack == 5


def test_session_closed_at_token_expiry_and_command_never_arrives(server):
    thermo, t_tokens = paired(server, "thermo-1")
    panel, p_tokens = paired(server, "panel-1")
    t = thermo.session(t_tokens["access_token"])
    t.subscribe("home/thermo-1/power/set")
    server.clock.advance(901)
    assert t.disconnected.wait(2)
    server.clock.advance(-901)
    p = panel.session(p_tokens["access_token"])
    server.clock.advance(901)
    p.publish("home/thermo-1/power/set", b"on")
    assert t.received("home/thermo-1/power/set") == []


def test_no_secret_reaches_the_log(server, caplog):
    caplog.set_level(logging.DEBUG, logger="iotauth")
    thermo, tokens = paired(server, "thermo-1")
    at = tokens["access_token"]
    thermo.session(at, password=at)  # refused: the log says why, without the token
    new = thermo.refresh(tokens["refresh_token"])
    thermo.refresh(tokens["refresh_token"] + "x")
    secrets_seen = [at, at.split(".")[2], tokens["refresh_token"], new["refresh_token"], new["access_token"]]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "CONNECT refused" in text and "issued tokens" in text
    for secret in secrets_seen:
        assert secret not in text


def test_device_paired_through_the_http_form_gets_tokens_and_connects(server):
    from tests.test_web import Visitor

    dev = Device(server.mqtt_port, "lamp-1", server.clock)
    auth = dev.authorize()
    assert dev.poll(auth["device_code"])["error"] == "authorization_pending"
    person = Visitor(server.http_url)
    person.get(auth["verification_uri_complete"].replace("localhost", "127.0.0.1"))
    assert person.sign_in(next_url=f"/activate?user_code={auth['user_code']}").status_code == 303
    consent = person.enter(auth["user_code"])
    assert "Desk lamp" in consent.text and "lamp-1" in consent.text
    assert "Receive power on/off commands for itself" in consent.text
    assert person.decide(auth["user_code"], "approve").status_code == 200
    server.clock.advance(5)
    tokens = dev.poll(auth["device_code"])
    assert tokens["scope"] == "device:power"
    assert dev.session(tokens["access_token"]).connack == 0
    person.http.close()


def test_will_rules_follow_the_token_scopes(server):
    thermo, tokens = paired(server, "thermo-1")
    at = tokens["access_token"]
    assert thermo.session(at, will=("home/panel-1/temperature", b"gone")).connack == 5  # not in its scopes
    boot_with_will = Mqtt(server.mqtt_port, "bootwill", will=("oauth/v1/token", b"x"))
    assert boot_with_will.connect() == 5  # a bootstrap session may not set a Will
    assert thermo.session(at, will=("home/thermo-1/temperature", b'{"celsius": null}')).connack == 0


def test_no_will_when_the_server_closes_a_revoked_session(server):
    thermo, t_tokens = paired(server, "thermo-1")
    panel, p_tokens = paired(server, "panel-1")
    p = panel.session(p_tokens["access_token"])
    p.subscribe("home/+/temperature")
    t = thermo.session(t_tokens["access_token"], will=("home/thermo-1/temperature", b"will"))
    t.publish("home/thermo-1/temperature", b"alive")
    assert p.wait_message("home/thermo-1/temperature") == [b"alive"]
    server.call(server.service.revoke_client, "thermo-1", server.clock.now())
    assert t.disconnected.wait(2)
    assert p.wait_for(lambda: b"will" in p.received("home/thermo-1/temperature"), timeout=1.0) is False


def test_pairing_again_replaces_the_previous_grant(server):
    old_dev, old_tokens = paired(server, "thermo-1")
    old_session = old_dev.session(old_tokens["access_token"])
    new_dev, new_tokens = paired(server, "thermo-1")  # e.g. after a factory reset: a new key
    assert old_session.disconnected.wait(2)
    assert old_dev.refresh(old_tokens["refresh_token"])["error"] == "invalid_grant"
    assert new_dev.refresh(new_tokens["refresh_token"])["token_type"] == "DPoP"
    assert [g.client_id for g in server.call(server.service.store.live_grants)] == ["thermo-1"]


def test_a_second_serve_on_the_same_data_dir_is_refused(server):
    result = runner.invoke(app, ["serve", "--mqtt-port", "0", "--http-port", "0", "--data-dir",
                                 str(server.settings.data_dir)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: another iotauth serve is already running on {server.settings.data_dir}"


def test_a_locked_database_gets_temporarily_unavailable_then_recovers(server):
    import sqlite3

    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    other = sqlite3.connect(server.settings.db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert dev.request("device_authorization")["error"] == "temporarily_unavailable"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "user_code" in dev.request("device_authorization")


def test_nonces_and_proofs_from_before_a_restart_are_not_accepted_after_it(settings, clock):
    from tests.conftest import start_server

    first = start_server(settings, clock)
    dev = Device(first.mqtt_port, "thermo-1", clock)
    nonce = dev.request("device_authorization")["dpop_nonce"]
    used = dev.proof("device_authorization", nonce=nonce, iat=0)  # a device without a clock
    assert "user_code" in dev.request("device_authorization", dpop=used)
    dev.close()
    first.stop()
    second = start_server(settings, clock)
    try:
        again = Device(second.mqtt_port, "thermo-1", clock)
        assert again.request("device_authorization", dpop=used)["error"] == "use_dpop_nonce"
        again.close()
    finally:
        second.stop()
