"""The device flow (RFC 8628, protocol.md sections 3 and 5): user codes, polling, and the order of checks.

A real AuthService on a real SQLite file; time is the fake clock's, passed in.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from joserfc.jwk import ECKey

from authsvc import device_flow
from authsvc.errors import ExpiredUserCode, OAuthError, UnknownUserCode, UsedUserCode
from authsvc.grants import DEVICE_CODE_GRANT
from authsvc.service import AuthService
from tests.conftest import wire_reply as call
from tests.wire import decode_jwt, make_proof

KEY = ECKey.generate_key("P-256", private=True)
OTHER = ECKey.generate_key("P-256", private=True)
USER_CODE = re.compile(r"[ABCDEFGHJKLMNPQRSTUVWXYZ]{3}[2-9]{3}")  # no I, O, 0, 1


def outcome(reply: dict[str, Any]) -> str:
    return reply.get("error") or ("tokens" if reply.get("token_type") == "DPoP" else repr(reply))


def proof(key: ECKey, now: float, endpoint: str = "token", **kw: Any) -> str:
    return make_proof(key, "PUBLISH", f"oauth/v1/{endpoint}", iat=now, **kw)


def authorize(svc: AuthService, now: float, client_id: str = "lamp-1",
              key: ECKey | None = KEY) -> dict[str, Any]:
    params: dict[str, Any] = {"client_id": client_id}
    if key is not None:
        params["dpop"] = proof(key, now, "device_authorization")
    return svc.handle("device_authorization", params, now)


def poll(svc: AuthService, device_code: str, now: float, /, client_id: str = "lamp-1", key: ECKey = KEY,
         **overrides: Any) -> dict[str, Any]:
    params = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id,
              "dpop": proof(key, now)} | overrides
    return call(svc, "token", {k: v for k, v in params.items() if v is not DROP}, now)


DROP = object()


def code_state(svc: AuthService, device_code: str) -> tuple[Any, ...]:
    """(status, interval, last counted poll, sub): the status from the database, the polling state from
    the serving process's memory (device_flow.PollMemory), where it lives; before any poll, the issued
    interval and no poll."""
    code_hash = svc.hash_device_code(device_code)
    row = svc.store.device_code(code_hash)
    assert row is not None
    polled = svc.polls.get(code_hash)
    interval, last_poll = (polled.interval, polled.last_poll) if polled else (row.interval, None)
    return row.status, interval, last_poll, row.sub


def waits(reply: dict[str, Any]) -> str:
    """What a slow_down reply tells the device on the wire: the interval it must keep from now on."""
    return reply["error_description"]


# -- the device authorization response ----------------------------------------------------------------

def test_device_authorization_returns_rfc8628_fields_and_protocol_values(svc, clock):
    reply = authorize(svc, clock.now())
    assert re.fullmatch(r"[A-Za-z0-9]{64}", reply["device_code"])
    assert USER_CODE.fullmatch(reply["user_code"])
    assert reply["verification_uri"] == svc.settings.issuer + "/activate"
    assert reply["verification_uri_complete"] == f"{reply['verification_uri']}?user_code={reply['user_code']}"
    assert (reply["expires_in"], reply["interval"]) == (600, 5)


def test_user_codes_use_letters_then_digits_without_look_alikes(svc, clock):
    codes = [device_flow.new_user_code() for _ in range(600)]
    clients = ["lamp-1", "lamp-2", "thermo-1", "panel-1"]  # at most MAX_PENDING_CODES pending per client
    codes += [authorize(svc, clock.now(), clients[i % 4])["user_code"] for i in range(20)]
    bad = [c for c in codes if not USER_CODE.fullmatch(c)]
    assert bad == []
    assert set("".join(c[:3] for c in codes)) == set("ABCDEFGHJKLMNPQRSTUVWXYZ")  # the whole alphabet is used
    device_codes = {authorize(svc, clock.now(), clients[i % 4])["device_code"] for i in range(20)}
    assert len(device_codes) == 20


@pytest.mark.parametrize("params, expected", [
    pytest.param({"client_id": "nobody"}, "invalid_client", id="unknown client"),
    pytest.param({"client_id": "lamp/1"}, "invalid_client", id="client id with a slash"),
    pytest.param({"client_id": "#"}, "invalid_client", id="client id #"),
    pytest.param({}, "invalid_request", id="client_id missing"),
    pytest.param({"client_id": ["lamp-1"]}, "invalid_request", id="client_id a list"),
    pytest.param({"client_id": "lamp-1", "scope": 5}, "invalid_request", id="scope a number"),
    pytest.param({"client_id": "lamp-1", "scope": "control:power"}, "invalid_scope",
                 id="scope not registered"),
    pytest.param({"client_id": "lamp-1", "scope": " "}, "invalid_scope", id="scope blank"),
    pytest.param({"client_id": "lamp-1", "dpop": "x.y.z"}, "invalid_dpop_proof", id="broken proof"),
    pytest.param({"client_id": "lamp-1", "dpop": None}, "invalid_dpop_proof", id="proof null"),
])
def test_device_authorization_refusals(svc, clock, params, expected):
    assert call(svc, "device_authorization", params, clock.now()).get("error") == expected


def test_requested_scope_is_kept_and_defaults_to_the_registered_scope(svc, clock):
    now = clock.now()
    narrow = svc.handle("device_authorization", {"client_id": "thermo-1", "scope": "device:power"}, now)
    full = svc.handle("device_authorization", {"client_id": "thermo-1"}, now)
    assert svc.pending_request(narrow["user_code"], now).scopes[0][0] == "device:power"
    assert [s for s, _ in svc.pending_request(full["user_code"], now).scopes] == ["write:temperature",
                                                                                 "device:power"]


# -- F2: user code entry ignores case, spaces and dashes, and nothing else -------------------------------

@pytest.fixture
def code_abc123(svc: AuthService, clock: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    # the code of cases.md F2; issued codes avoid 1, but entry matches whatever code was stored
    monkeypatch.setattr(device_flow, "new_user_code", lambda: "ABC123")
    authorize(svc, clock.now())
    return "ABC123"


@pytest.mark.parametrize("entered", ["ABC123", "abc123", "ABC-123", "abc-123", " abc 123 ", "a-b-c-1-2-3",
                                     "\tAbC 123\t"])
def test_user_code_entry_finds_the_grant(svc, clock, code_abc123, entered):
    assert svc.pending_request(entered, clock.now()).user_code == "ABC123"


@pytest.mark.parametrize("entered", ["ABC12", "ABC1234", "XABC123", "BC123", "ABC_123", "ABC.123", "ABC123\n",
                                     "", "ＡＢＣ１２３", "ABC%31%32%33", "ABC1*", "%", "ABD123", "ABC124"])
def test_user_code_entry_finds_nothing_else(svc, clock, code_abc123, entered):
    with pytest.raises(UnknownUserCode):
        svc.pending_request(entered, clock.now())


def test_user_code_entry_does_not_fold_unicode_into_a_code(svc, clock, monkeypatch):
    monkeypatch.setattr(device_flow, "new_user_code", lambda: "FFS234")
    authorize(svc, clock.now())
    assert svc.pending_request("ffs-234", clock.now()).user_code == "FFS234"
    # the ff ligature and the long s: str.upper() turns them into FF and S
    for entered in ("\ufb00s234", "ff\u017f234", "\ufb00\u017f234"):
        with pytest.raises(UnknownUserCode):
            svc.pending_request(entered, clock.now())


# -- F3: expiry comes first ---------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, expected", [
    pytest.param(599, "authorization_pending", id="T0+599: pending"),
    pytest.param(600, "expired_token", id="T0+600: expired"),
    pytest.param(601, "expired_token", id="T0+601: expired"),
    pytest.param(86400, "expired_token", id="a day later: expired"),
])
def test_never_approved_code_expires(svc, clock, seconds, expected):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    assert outcome(poll(svc, code, t0 + seconds)) == expected


def test_expired_code_is_expired_token_even_right_after_a_poll(svc, clock):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    assert outcome(poll(svc, code, t0 + 598)) == "authorization_pending"
    assert outcome(poll(svc, code, t0 + 601)) == "expired_token"  # not slow_down, not pending


def test_expired_code_cannot_be_approved_and_nothing_is_stored(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    before = code_state(svc, auth["device_code"])
    with pytest.raises(ExpiredUserCode):
        svc.decide(auth["user_code"], "alice", True, t0 + 601)
    with pytest.raises(ExpiredUserCode):
        svc.pending_request(auth["user_code"], t0 + 601)
    assert code_state(svc, auth["device_code"]) == before == ("pending", 5, None, None)
    assert svc.store.live_grants() == []
    assert outcome(poll(svc, auth["device_code"], t0 + 602)) == "expired_token"


def test_approved_code_polled_after_it_expired_is_expired_token(svc, clock):
    """protocol.md section 3 step 4 lists Expired before Approved."""
    t0 = clock.now()
    auth = authorize(svc, t0)
    svc.decide(auth["user_code"], "alice", True, t0 + 590)
    assert outcome(poll(svc, auth["device_code"], t0 + 601)) == "expired_token"
    assert svc.store.live_grants() == []


# -- F4: denial -----------------------------------------------------------------------------------------

def test_denial_reaches_every_later_poll_and_cannot_be_flipped(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    assert outcome(poll(svc, auth["device_code"], t0)) == "authorization_pending"
    svc.decide(auth["user_code"], "alice", False, t0 + 1)
    assert outcome(poll(svc, auth["device_code"], t0 + 2)) == "access_denied"  # soon after: not slow_down
    for later in (10, 20, 300):
        assert outcome(poll(svc, auth["device_code"], t0 + later)) == "access_denied"
    for approve in (True, False):
        with pytest.raises(UsedUserCode):
            svc.decide(auth["user_code"].lower(), "admin", approve, t0 + 30)
    with pytest.raises(UsedUserCode):
        svc.pending_request(auth["user_code"], t0 + 30)
    assert outcome(poll(svc, auth["device_code"], t0 + 400)) == "access_denied"
    assert code_state(svc, auth["device_code"])[0] == "denied"


def test_approval_is_single_use(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    svc.decide(auth["user_code"], "alice", True, t0)
    with pytest.raises(UsedUserCode):
        svc.decide(auth["user_code"], "mallory", False, t0)
    assert outcome(poll(svc, auth["device_code"], t0 + 1)) == "tokens"
    with pytest.raises(UsedUserCode):
        svc.decide(auth["user_code"], "mallory", True, t0 + 2)


# -- F5: wrong client ------------------------------------------------------------------------------------

def test_device_code_of_lamp_1_polled_as_lamp_2_is_invalid_grant_and_lamp_1_still_redeems_it(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    svc.decide(auth["user_code"], "alice", True, t0)
    assert outcome(poll(svc, auth["device_code"], t0 + 1, client_id="lamp-2")) == "invalid_grant"
    reply = poll(svc, auth["device_code"], t0 + 1)
    assert outcome(reply) == "tokens"
    assert decode_jwt(reply["access_token"])[1]["client_id"] == "lamp-1"
    assert outcome(poll(svc, auth["device_code"], t0 + 2)) == "invalid_grant"  # single use


# -- F6: polling ----------------------------------------------------------------------------------------

def test_polling_pending_slow_down_pending_then_tokens(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    code = auth["device_code"]
    assert outcome(poll(svc, code, t0)) == "authorization_pending"  # first poll at once: never slow_down
    reply = poll(svc, code, t0 + 2)
    assert outcome(reply) == "slow_down"
    assert "wait at least 10 s" in waits(reply)  # the interval grew by 5 s ...
    assert code_state(svc, code)[1] == 10  # ... and the service holds the device to it
    assert outcome(poll(svc, code, t0 + 12)) == "authorization_pending"
    assert outcome(poll(svc, code, t0 + 22)) == "authorization_pending"
    svc.decide(auth["user_code"], "alice", True, t0 + 23)
    assert outcome(poll(svc, code, t0 + 24)) == "tokens"  # approved: tokens, whatever the timing


def test_each_early_poll_grows_the_interval_by_five_seconds(svc, clock):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    assert outcome(poll(svc, code, t0)) == "authorization_pending"
    replies = [poll(svc, code, t0 + i) for i in (1, 2, 3)]
    assert [r["error"] for r in replies] == ["slow_down"] * 3
    assert [waits(r) for r in replies] == [f"Polling too fast: wait at least {s} s between polls"
                                           for s in (10, 15, 20)]
    assert code_state(svc, code)[1] == 20
    assert outcome(poll(svc, code, t0 + 3 + 19)) == "slow_down"  # sooner than the current 20 s
    assert outcome(poll(svc, code, t0 + 22 + 25)) == "authorization_pending"


@pytest.mark.parametrize("gap, expected", [(4, "slow_down"), (5, "authorization_pending")])
def test_poll_at_the_interval_is_not_early(svc, clock, gap, expected):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    poll(svc, code, t0)
    assert outcome(poll(svc, code, t0 + gap)) == expected


# -- the polling state lives in the serving process's memory, not in the database -------------------------

def test_polls_write_nothing_to_the_database(svc, clock):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    changes = svc.store.conn.total_changes
    assert [outcome(poll(svc, code, t0 + s)) for s in (0, 1, 11)] == ["authorization_pending", "slow_down",
                                                                      "authorization_pending"]
    assert svc.store.conn.total_changes == changes
    assert code_state(svc, code) == ("pending", 10, t0 + 11, None)


def test_after_a_restart_the_first_poll_is_not_flagged(svc, clock):
    from authsvc.datadir import open_service

    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    assert [outcome(poll(svc, code, t0 + s)) for s in (0, 1)] == ["authorization_pending", "slow_down"]
    later = open_service(svc.settings)  # a restart: the polling state is gone, the code is not
    try:
        now = t0 + 2  # early for the interval of 10 s the device had earned
        nonce = later.current_nonce(now)  # a restarted server wants a nonce (dpop.RestartGuard)
        assert outcome(poll(later, code, now, dpop=proof(KEY, now, nonce=nonce))) == "authorization_pending"
        assert code_state(later, code) == ("pending", 5, now, None)  # the issued interval again
        now += 1
        assert outcome(poll(later, code, now, dpop=proof(KEY, now, nonce=nonce))) == "slow_down"
    finally:
        later.store.close()


def test_polling_state_is_dropped_when_the_code_is_decided_used_or_expired(svc, clock):
    t0 = clock.now()
    approved, denied, expired, left = (authorize(svc, t0) for _ in range(4))
    for auth in (approved, denied, expired, left):
        assert outcome(poll(svc, auth["device_code"], t0)) == "authorization_pending"
    assert len(svc.polls) == 4
    svc.decide(approved["user_code"], "alice", True, t0 + 1)
    svc.decide(denied["user_code"], "alice", False, t0 + 1)
    assert outcome(poll(svc, approved["device_code"], t0 + 2)) == "tokens"
    assert outcome(poll(svc, denied["device_code"], t0 + 2)) == "access_denied"
    assert outcome(poll(svc, expired["device_code"], t0 + 600)) == "expired_token"
    assert len(svc.polls) == 1  # only the one still pending and unpolled since
    svc.maintenance(t0 + 599)
    assert len(svc.polls) == 1
    svc.maintenance(t0 + 600)  # expired, never polled again: the sweep forgets it
    assert len(svc.polls) == 0


def test_polling_memory_is_bounded_least_recently_polled_first(svc, clock, monkeypatch):
    monkeypatch.setattr(svc.polls, "capacity", 2)
    t0 = clock.now()
    codes = [authorize(svc, t0)["device_code"] for _ in range(3)]
    for i, code in enumerate(codes):
        assert outcome(poll(svc, code, t0 + i)) == "authorization_pending"
    assert len(svc.polls) == 2
    assert code_state(svc, codes[0])[2] is None  # forgotten: its next poll is not flagged
    assert outcome(poll(svc, codes[0], t0 + 3)) == "authorization_pending"
    assert outcome(poll(svc, codes[2], t0 + 4)) == "slow_down"  # still remembered
    assert code_state(svc, codes[1])[2] is None and len(svc.polls) == 2


# -- the order of checks on P/token: steps 1-3 never count as polls ------------------------------------

def replayed(svc: AuthService, now: float) -> str:
    used = proof(KEY, now)
    svc.dpop.verify(used, htm="PUBLISH", htu="oauth/v1/token", now=now)
    return used


ORDER_CASES: list[Any] = [
    # step 1: envelope, parameters, client (the proof is broken too: it must not be looked at first)
    ("unknown client, broken proof", {"client_id": "nobody", "dpop": "x"}, "invalid_client"),
    ("client id not an identity", {"client_id": "lamp-1/#", "dpop": "x"}, "invalid_client"),
    ("client_id missing", {"client_id": DROP, "dpop": "x"}, "invalid_request"),
    ("client_id a number", {"client_id": 1, "dpop": "x"}, "invalid_request"),
    ("device_code missing", {"device_code": DROP, "dpop": "x"}, "invalid_request"),
    ("device_code a number", {"device_code": 12345, "dpop": "x"}, "invalid_request"),
    ("device_code null", {"device_code": None, "dpop": "x"}, "invalid_request"),
    ("device_code of 5000 characters", {"device_code": "A" * 5000, "dpop": "x"}, "invalid_request"),
    ("grant_type missing", {"grant_type": DROP, "dpop": "x"}, "invalid_request"),
    ("grant_type a number", {"grant_type": 7, "dpop": "x"}, "invalid_request"),
    ("grant_type password", {"grant_type": "password", "dpop": "x"}, "unsupported_grant_type"),
    ("grant_type with different case", {"grant_type": DEVICE_CODE_GRANT.upper(), "dpop": "x"},
     "unsupported_grant_type"),
    ("unknown grant_type before unknown client", {"grant_type": "client_credentials", "client_id": "nobody"},
     "unsupported_grant_type"),
    # step 2: the proof
    ("proof missing", {"dpop": DROP}, "invalid_dpop_proof"),
    ("proof not a JWT", {"dpop": "x.y.z"}, "invalid_dpop_proof"),
    ("proof for another topic", {"dpop": lambda s, n: proof(KEY, n, "revoke")}, "invalid_dpop_proof"),
    ("proof replayed", {"dpop": replayed}, "invalid_dpop_proof"),
    ("proof with a stale iat and no nonce", {"dpop": lambda s, n: proof(KEY, n - 61)}, "use_dpop_nonce"),
    ("proof with a made-up nonce", {"dpop": lambda s, n: proof(KEY, n, nonce="made-up")}, "use_dpop_nonce"),
    # step 3: lookup
    ("unknown device_code", {"device_code": "B" * 64}, "invalid_grant"),
    ("device code of lamp-1 presented by lamp-2", {"client_id": "lamp-2"}, "invalid_grant"),
    ("proof key not the key the code was bound to", {"dpop": lambda s, n: proof(OTHER, n)}, "invalid_grant"),
]


@pytest.mark.parametrize("overrides, expected", [pytest.param(o, e, id=i) for i, o, e in ORDER_CASES])
def test_refusals_before_the_poll_do_not_count_as_polls(svc, clock, overrides, expected):
    t0 = clock.now()
    code = authorize(svc, t0)["device_code"]
    assert outcome(poll(svc, code, t0)) == "authorization_pending"  # a counted poll at t0
    before = code_state(svc, code)
    now = t0 + 5
    resolved = {k: (v(svc, now) if callable(v) else v) for k, v in overrides.items()}
    assert outcome(poll(svc, code, now, **resolved)) == expected
    assert code_state(svc, code) == before
    assert outcome(poll(svc, code, now)) == "authorization_pending"  # not slow_down: the refusal was no poll


def test_refusals_before_the_lookup_leave_an_approved_code_redeemable(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0)
    svc.decide(auth["user_code"], "alice", True, t0)
    for overrides in ({"dpop": "x"}, {"dpop": proof(OTHER, t0)}, {"client_id": "lamp-2"}):
        refused = outcome(poll(svc, auth["device_code"], t0, **overrides))
        assert refused in ("invalid_dpop_proof", "invalid_grant")
    assert outcome(poll(svc, auth["device_code"], t0)) == "tokens"


def test_bound_code_issues_tokens_bound_to_the_binding_key(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0, key=KEY)
    svc.decide(auth["user_code"], "alice", True, t0)
    reply = poll(svc, auth["device_code"], t0 + 1)
    assert decode_jwt(reply["access_token"])[1]["cnf"] == {"jkt": KEY.thumbprint()}


def test_unbound_code_binds_tokens_to_the_token_request_key(svc, clock):
    t0 = clock.now()
    auth = authorize(svc, t0, key=None)
    svc.decide(auth["user_code"], "alice", True, t0)
    reply = poll(svc, auth["device_code"], t0 + 1, key=OTHER)
    assert outcome(reply) == "tokens"
    claims = decode_jwt(reply["access_token"])[1]
    assert claims["cnf"] == {"jkt": OTHER.thumbprint()} and claims["sub"] == "alice"
    # ... and the refresh token too: only that key can use it
    refresh = {"grant_type": "refresh_token", "refresh_token": reply["refresh_token"], "client_id": "lamp-1"}
    assert call(svc, "token", refresh | {"dpop": proof(KEY, t0 + 2)}, t0 + 2)["error"] == "invalid_grant"
    assert outcome(call(svc, "token", refresh | {"dpop": proof(OTHER, t0 + 2)}, t0 + 2)) == "tokens"


def test_removing_a_client_cancels_its_pending_codes(svc, clock):
    reply = authorize(svc, clock.now())
    svc.remove_client("lamp-1", clock.now())
    with pytest.raises(UnknownUserCode):
        svc.decide(reply["user_code"], "admin", True, clock.now())
    svc.register_client("lamp-1", "device:power", None, clock.now())  # registered again, maybe narrower
    assert outcome(poll(svc, reply["device_code"], clock.now())) == "invalid_grant"


def test_pending_codes_per_client_and_address_are_capped(svc, clock):
    from authsvc.service import PENDING_PER_SOURCE

    for _ in range(PENDING_PER_SOURCE):
        authorize(svc, clock.now())
    assert call(svc, "device_authorization", {"client_id": "lamp-1"}, clock.now())["error"] \
        == "temporarily_unavailable"
    assert "user_code" in call(svc, "device_authorization", {"client_id": "lamp-2"}, clock.now())
    clock.advance(601)  # the pending ones expire
    assert "user_code" in call(svc, "device_authorization", {"client_id": "lamp-1"}, clock.now())


def test_a_host_that_guesses_a_client_id_cannot_stop_that_device_pairing(svc, clock):
    """client_ids are not secret: 20 pending codes asked from one address leave others free to pair."""
    from authsvc.service import PENDING_PER_SOURCE

    now = clock.now()
    for _ in range(PENDING_PER_SOURCE):
        svc.handle("device_authorization", {"client_id": "lamp-1"}, now, source="192.0.2.66")
    assert wire_reply_from(svc, "192.0.2.66", now)["error"] == "temporarily_unavailable"
    assert "user_code" in wire_reply_from(svc, "192.0.2.10", now)  # the device itself


def test_pending_codes_per_client_are_bounded_over_many_addresses(svc, clock, monkeypatch):
    monkeypatch.setattr("authsvc.service.MAX_PENDING_CODES", 3)
    now = clock.now()
    for n in range(3):
        assert "user_code" in wire_reply_from(svc, f"192.0.2.{n}", now)
    assert wire_reply_from(svc, "192.0.2.99", now)["error"] == "temporarily_unavailable"


def wire_reply_from(svc, source: str, now: float) -> dict:
    try:
        return svc.handle("device_authorization", {"client_id": "lamp-1"}, now, source=source)
    except OAuthError as exc:
        return exc.to_wire()
