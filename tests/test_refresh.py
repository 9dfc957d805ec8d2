"""Refresh tokens (RFC 6749 section 6, protocol.md section 5): rotation, retry grace, reuse, races, idle life.

Runs a real AuthService on a real SQLite file with the fake clock's time passed in; the live-session
disconnect of R2 runs over real MQTT with the `server` fixture.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import pytest
from joserfc.jwk import ECKey

from authsvc.config import ConfigError, load_settings
from authsvc.datadir import open_service
from authsvc.grants import DEVICE_CODE_GRANT
from authsvc.keys import b64u_decode
from authsvc.service import AuthService, ConnectRefused
from tests.conftest import wire_reply as call
from tests.wire import Device, decode_jwt, make_proof

DAY = 86400
KEY = ECKey.generate_key("P-256", private=True)
THIEF = ECKey.generate_key("P-256", private=True)
SCOPE = "write:temperature device:power"


def token_proof(key: ECKey, now: float, nonce: str | None = None) -> str:
    return make_proof(key, "PUBLISH", "oauth/v1/token", iat=now, nonce=nonce)


def pair(svc: AuthService, now: float, client_id: str = "thermo-1", key: ECKey = KEY) -> dict[str, Any]:
    auth = svc.handle("device_authorization", {"client_id": client_id}, now)
    svc.decide(auth["user_code"], "alice", True, now)
    tokens = call(svc, "token", {"grant_type": DEVICE_CODE_GRANT, "device_code": auth["device_code"],
                                 "client_id": client_id, "dpop": token_proof(key, now)}, now)
    assert tokens.get("token_type") == "DPoP", tokens
    return tokens


def refresh(svc: AuthService, refresh_token: str, now: float, key: ECKey = KEY, client_id: str = "thermo-1",
            nonce: str | None = None, **extra: Any) -> dict[str, Any]:
    return call(svc, "token", {"grant_type": "refresh_token", "refresh_token": refresh_token,
                               "client_id": client_id, "dpop": token_proof(key, now, nonce), **extra}, now)


def ok(reply: dict[str, Any]) -> str:
    assert reply.get("token_type") == "DPoP", reply
    return reply["refresh_token"]


def grant_rows(settings: Any) -> list[tuple[Any, ...]]:
    """(grant, revoked, used) per refresh token, read through a separate connection like another process."""
    with sqlite3.connect(settings.db_path) as db:
        return db.execute("SELECT g.grant_id, g.revoked, r.used FROM grants g JOIN refresh_tokens r"
                          " ON r.grant_id = g.grant_id ORDER BY r.issued, r.used IS NULL").fetchall()


# -- rotation -------------------------------------------------------------------------------------------

def test_refresh_rotates_and_the_successor_is_bound_to_the_same_key(svc, clock):
    rt0 = pair(svc, clock.now())["refresh_token"]
    clock.advance(60)
    reply = refresh(svc, rt0, clock.now())
    rt1 = ok(reply)
    assert rt1 != rt0 and len(rt1) >= 43  # 256 bits, base64url
    assert decode_jwt(reply["access_token"])[1]["cnf"] == {"jkt": KEY.thumbprint()}
    assert reply["scope"] == SCOPE and reply["expires_in"] == 900
    clock.advance(60)
    assert refresh(svc, rt1, clock.now(), key=THIEF) == {
        "error": "invalid_grant", "error_description": "The refresh token is bound to another key"}
    assert ok(refresh(svc, rt1, clock.now())) not in (rt0, rt1)


@pytest.mark.parametrize("seconds_after_rotation", [0, 10, 30])
def test_retry_within_grace_gets_the_same_successor_and_a_fresh_access_token(svc, clock,
                                                                            seconds_after_rotation):
    rt0 = pair(svc, clock.now())["refresh_token"]
    first = refresh(svc, rt0, clock.now())
    clock.advance(seconds_after_rotation)
    again = refresh(svc, rt0, clock.now())
    assert ok(again) == ok(first)
    assert again["access_token"] != first["access_token"]
    assert decode_jwt(again["access_token"])[1]["jti"] != decode_jwt(first["access_token"])[1]["jti"]
    assert ok(refresh(svc, first["refresh_token"], clock.now()))  # the successor still works


def test_retry_within_grace_after_the_successor_was_used_revokes_the_grant(svc, clock):
    rt0 = pair(svc, clock.now())["refresh_token"]
    rt1 = ok(refresh(svc, rt0, clock.now()))
    clock.advance(5)
    rt2 = ok(refresh(svc, rt1, clock.now()))
    clock.advance(5)
    assert refresh(svc, rt0, clock.now())["error"] == "invalid_grant"
    assert refresh(svc, rt2, clock.now())["error"] == "invalid_grant"


# -- R2: reuse after the grace window -----------------------------------------------------------------

def test_reuse_after_grace_revokes_every_token_of_the_grant(svc, clock, settings):
    tokens = pair(svc, clock.now())
    rt0 = tokens["refresh_token"]
    second = refresh(svc, rt0, clock.now())
    rt1 = ok(second)
    clock.advance(31)
    assert refresh(svc, rt0, clock.now()) == {
        "error": "invalid_grant",
        "error_description": "The refresh token was already used; the grant has been revoked"}
    assert refresh(svc, rt1, clock.now())["error"] == "invalid_grant"
    assert all(revoked is not None for _, revoked, _ in grant_rows(settings))
    at = second["access_token"]
    proof = make_proof(KEY, "CONNECT", svc.settings.audience, iat=clock.now(), token=at)
    with pytest.raises(ConnectRefused, match="revoked"):
        svc.authorize_connect("thermo-1", "thermo-1", f"{at} {proof}", clock.now())


def test_reuse_of_a_replaced_token_by_another_key_changes_nothing(svc, clock, settings):
    rt0 = pair(svc, clock.now())["refresh_token"]
    rt1 = ok(refresh(svc, rt0, clock.now()))
    before = grant_rows(settings)
    for wait in (0, 31):  # within the grace window: no successor for the thief; after it: no revocation
        clock.advance(wait)
        assert refresh(svc, rt0, clock.now(), key=THIEF)["error"] == "invalid_grant"
    assert grant_rows(settings) == before
    assert ok(refresh(svc, rt1, clock.now()))


@pytest.mark.parametrize("who", ["another key", "another client", "unknown token"])
def test_refresh_by_someone_else_is_invalid_grant_and_the_owner_keeps_the_token(svc, clock, settings, who):
    rt0 = pair(svc, clock.now())["refresh_token"]
    before = grant_rows(settings)
    if who == "another key":
        reply = refresh(svc, rt0, clock.now(), key=THIEF)
    elif who == "another client":
        reply = refresh(svc, rt0, clock.now(), client_id="lamp-1")
    else:
        reply = refresh(svc, rt0[:-2] + "AA", clock.now())
    assert reply["error"] == "invalid_grant"
    assert grant_rows(settings) == before  # not marked used, grant not revoked
    assert ok(refresh(svc, rt0, clock.now()))


# -- R1: concurrent refreshes of one token -------------------------------------------------------------

def refresh_in_threads(settings: Any, rt: str, now: float, key: ECKey, n: int = 20) -> list[dict[str, Any]]:
    """n refreshes at once, each through its own service and SQLite connection, like n processes.

    Each proof carries its service's nonce: a service opened after another accepted nonce-less proofs
    cannot tell them from replays (dpop.RestartGuard), exactly as after a restart."""
    services = [open_service(settings) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = refresh(services[i], rt, now, key=key, nonce=services[i].current_nonce(now))
        except Exception as exc:  # noqa: BLE001 - a crash (database locked ...) must fail the test
            results[i] = {"crash": repr(exc)}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in services:
        s.store.close()
    return results


@pytest.mark.parametrize("mode", ["loop", "threads"])
def test_twenty_concurrent_refreshes_leave_one_successor(svc, clock, settings, mode):
    rt0 = pair(svc, clock.now())["refresh_token"]
    clock.advance(100)
    if mode == "loop":
        results = [refresh(svc, rt0, clock.now()) for _ in range(20)]
    else:
        results = refresh_in_threads(settings, rt0, clock.now(), KEY)
    successors = {ok(r) for r in results}  # every refresh within the grace window succeeds ...
    assert len(successors) == 1  # ... with the same successor
    assert len({r["access_token"] for r in results}) == 20
    rows = grant_rows(settings)
    assert [used is None for _, _, used in rows] == [False, True]  # rt0 used, exactly one successor
    (rt1,) = successors
    assert ok(refresh(svc, rt1, clock.now()))


@pytest.mark.parametrize("mode", ["loop", "threads"])
def test_twenty_concurrent_refreshes_with_another_key_are_all_refused(svc, clock, settings, mode):
    rt0 = pair(svc, clock.now())["refresh_token"]
    before = grant_rows(settings)
    if mode == "loop":
        results = [refresh(svc, rt0, clock.now(), key=THIEF) for _ in range(20)]
    else:
        results = refresh_in_threads(settings, rt0, clock.now(), THIEF)
    assert [r.get("error") for r in results] == ["invalid_grant"] * 20
    assert grant_rows(settings) == before
    assert ok(refresh(svc, rt0, clock.now()))


# -- R3: idle life ------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_use, second_use, expected", [
    pytest.param(180 * DAY - 1, None, "DPoP", id="unused for 180 days - 1 s: works"),
    pytest.param(180 * DAY, None, "invalid_grant", id="unused for exactly 180 days: refused"),
    pytest.param(180 * DAY + 1, None, "invalid_grant", id="unused for 180 days + 1 s: refused"),
    pytest.param(179 * DAY, 300 * DAY, "DPoP", id="used at day 179, successor at day 300: works"),
    pytest.param(179 * DAY, 359 * DAY - 1, "DPoP", id="used at day 179, successor at day 359 - 1 s: works"),
    pytest.param(179 * DAY, 359 * DAY + 1, "invalid_grant",
                 id="used at day 179, successor at day 359 + 1 s: refused"),
])
def test_refresh_token_expires_180_days_after_it_was_issued(svc, clock, first_use, second_use, expected):
    t0 = clock.now()
    rt = pair(svc, t0)["refresh_token"]
    clock.set(t0 + first_use)
    reply = refresh(svc, rt, clock.now())
    if second_use is not None:
        rt = ok(reply)
        clock.set(t0 + second_use)
        reply = refresh(svc, rt, clock.now())
    assert reply.get("token_type", reply.get("error")) == expected


def test_an_expired_refresh_token_is_refused_without_revoking_the_grant(svc, clock, settings):
    t0 = clock.now()
    rt = pair(svc, t0)["refresh_token"]
    clock.set(t0 + 181 * DAY)
    assert refresh(svc, rt, clock.now())["error"] == "invalid_grant"
    assert [revoked for _, revoked, _ in grant_rows(settings)] == [None]


# -- scope ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, expected", [
    pytest.param("device:power", "device:power", id="narrower: allowed"),
    pytest.param("device:power write:temperature", SCOPE, id="same set in another order: allowed"),
    pytest.param("device:power control:power", "invalid_scope", id="wider: invalid_scope"),
    pytest.param("read:temperature", "invalid_scope", id="another scope: invalid_scope"),
    pytest.param("", "invalid_scope", id="empty: invalid_scope"),
])
def test_refresh_may_narrow_the_scope_never_widen_it(svc, clock, requested, expected):
    rt0 = pair(svc, clock.now())["refresh_token"]
    reply = refresh(svc, rt0, clock.now(), scope=requested)
    if expected == "invalid_scope":
        assert reply["error"] == "invalid_scope"
        assert ok(refresh(svc, rt0, clock.now()))  # the refused request did not use up the token
    else:
        assert reply["scope"] == expected
        assert decode_jwt(reply["access_token"])[1]["scope"] == expected


# -- revocation by the owner ---------------------------------------------------------------------------

def test_refresh_after_the_owner_revokes_the_client_is_invalid_grant(svc, clock):
    rt0 = pair(svc, clock.now())["refresh_token"]
    other = pair(svc, clock.now(), client_id="lamp-1")["refresh_token"]
    assert svc.revoke_client("thermo-1", clock.now()) == 1
    assert refresh(svc, rt0, clock.now())["error"] == "invalid_grant"
    assert ok(refresh(svc, other, clock.now(), client_id="lamp-1"))  # only that client's grants


# -- secrets at rest -----------------------------------------------------------------------------------

def test_no_issued_secret_is_stored_in_the_database_file(svc, clock, settings):
    now = clock.now()
    auth = svc.handle("device_authorization", {"client_id": "thermo-1"}, now)
    svc.decide(auth["user_code"], "alice", True, now)
    first = call(svc, "token", {"grant_type": DEVICE_CODE_GRANT, "device_code": auth["device_code"],
                                "client_id": "thermo-1", "dpop": token_proof(KEY, now)}, now)
    second = refresh(svc, first["refresh_token"], now)  # its successor is kept sealed for the grace retry
    secrets = {"device code": auth["device_code"], "refresh token": first["refresh_token"],
               "successor refresh token": second["refresh_token"], "access token": first["access_token"],
               "signing key d": svc.keys.active.key.as_dict(private=True)["d"]}
    raw = {"signing key d (raw)": b64u_decode(secrets["signing key d"]),
           **{f"secret {name} (raw)": value for name, value in svc.keys.secrets.items()}}
    svc.store.close()
    files = [p for p in settings.data_dir.iterdir() if p.name.startswith("iotauth.db")]
    blob = b"".join(p.read_bytes() for p in files)
    with sqlite3.connect(settings.db_path) as db:
        dump = "\n".join(db.iterdump())
    assert settings.db_path in files and len(blob) > 4096
    for name, value in secrets.items():
        assert value.encode() not in blob, f"{name} found in the database files"
        assert value not in dump, f"{name} found in the database rows"
    for name, value in raw.items():
        assert value not in blob, f"{name} found in the database files"


def test_a_copy_of_the_database_yields_no_usable_refresh_token(svc, clock, settings):
    rt0 = pair(svc, clock.now())["refresh_token"]
    rt1 = ok(refresh(svc, rt0, clock.now()))  # rt0's row now also holds rt1's hash and sealed copy
    with sqlite3.connect(settings.db_path) as db:  # what a thief who copied the file can read
        stored = {v for row in db.execute("SELECT token_hash, successor_hash, successor_sealed FROM refresh_tokens")
                  for v in row if v}
    assert len(stored) == 3
    for value in stored:  # even presented with the device's own key
        assert refresh(svc, value, clock.now())["error"] == "invalid_grant"
    assert ok(refresh(svc, rt1, clock.now()))  # and nothing the thief tried cost the device its token


# -- R2 on the wire: the live session is closed ---------------------------------------------------------

def test_reuse_after_grace_disconnects_the_live_session(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    rt0 = tokens["refresh_token"]
    new = dev.refresh(rt0)
    session = dev.session(new["access_token"])
    assert session.connack == 0
    # within grace: the same successor, and the session stays up
    assert dev.refresh(rt0)["refresh_token"] == new["refresh_token"]
    asyncio.run_coroutine_threadsafe(server.run.gate.sweep(), server.loop).result(5)
    session.publish("home/thermo-1/temperature", b'{"celsius": 20}', qos=1)  # waits for the PUBACK
    assert not session.disconnected.is_set()
    server.clock.advance(31)
    assert dev.refresh(rt0)["error"] == "invalid_grant"
    assert session.disconnected.wait(1.5), "live session still open after refresh-token reuse"
    assert dev.refresh(new["refresh_token"])["error"] == "invalid_grant"
    assert dev.session(new["access_token"]).connack == 5
    dev.close()


# -- optional absolute lifetime (tokens.refresh_absolute_days) ----------------------------------------------

def service_with(settings: Any, config: str) -> AuthService:
    (settings.data_dir / "iotauth.toml").write_text(config)
    return open_service(load_settings(settings.data_dir))


def test_the_absolute_lifetime_is_off_by_default(settings):
    assert settings.refresh_absolute_days == 0


@pytest.mark.parametrize("config, problem", [
    pytest.param("[tokens]\nrefresh_absolute_days = -1\n", "tokens.refresh_absolute_days = -1 must not be negative",
                 id="negative"),
    pytest.param('[tokens]\nrefresh_absolute_days = "365"\n',
                 "tokens.refresh_absolute_days = '365' has the wrong type", id="a string"),
])
def test_a_bad_absolute_lifetime_is_refused_at_load_naming_the_key(settings, config, problem):
    (settings.data_dir / "iotauth.toml").write_text(config)
    with pytest.raises(ConfigError) as exc:
        load_settings(settings.data_dir)
    assert str(exc.value) == f"{settings.data_dir / 'iotauth.toml'}: {problem}"


def test_a_grant_past_its_absolute_lifetime_cannot_be_refreshed_however_often_it_was_used(svc, clock, settings):
    svc.store.close()
    limited = service_with(settings, "[tokens]\nrefresh_absolute_days = 200\n")
    try:
        t0 = clock.now()
        rt = pair(limited, t0)["refresh_token"]
        for day in (60, 120, 180):  # used well within the 180-day idle life each time
            clock.set(t0 + day * DAY)
            rt = ok(refresh(limited, rt, clock.now()))
        clock.set(t0 + 200 * DAY - 1)
        previous, rt = rt, ok(refresh(limited, rt, clock.now()))  # the last second of the grant's life
        clock.set(t0 + 200 * DAY)
        assert refresh(limited, rt, clock.now()) == {
            "error": "invalid_grant",
            "error_description": "The grant has reached its maximum lifetime; pair the device again"}
        assert refresh(limited, previous, clock.now())["error"] == "invalid_grant"  # a grace retry: refused too
        rows = grant_rows(settings)
        assert all(revoked is None for _, revoked, _ in rows)  # refused, not revoked: nothing was reused
        assert [used is None for _, _, used in rows][-1]  # the last successor was not used up
    finally:
        limited.store.close()
