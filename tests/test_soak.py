"""Soak and fuzz: the short versions run in `make test`; the long ones carry the `soak` marker (`make test-all`)."""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.wire import Device

SHORT, LONG = 3, 150


def eventually(condition: Any, timeout: float = 3.0) -> bool:
    """The broker handles a client's DISCONNECT asynchronously: wait for the condition, bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def open_fds() -> int:
    gc.collect()  # closed paho clients release their wake-up socket pairs when collected
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("rounds", [pytest.param(SHORT, id="short"),
                                    pytest.param(LONG, id="long", marks=pytest.mark.soak)])
def test_pair_connect_refresh_revoke_cycles_leave_nothing_behind(server, rounds):
    fds_before = None
    for round_no in range(rounds):
        dev = Device(server.mqtt_port, "thermo-1", server.clock)
        auth = dev.authorize()
        server.approve(auth["user_code"])
        tokens = dev.poll(auth["device_code"])
        s = dev.session(tokens["access_token"])
        assert s.connack == 0, round_no
        s.publish("home/thermo-1/temperature", json.dumps({"celsius": round_no}))
        new = dev.refresh(tokens["refresh_token"])
        assert dev.session(new["access_token"]).connack == 0
        server.call(server.service.revoke_client, "thermo-1", server.clock.now())
        assert dev.sessions[-1].disconnected.wait(2), round_no
        dev.close()
        server.clock.advance(700)  # past the replay memory's retention: its entries must go
        if round_no == 0:
            fds_before = open_fds()
    assert server.call(lambda: len(server.run.gate._devices)) == 0
    connected = lambda: server.call(lambda: [c for c, (s, _) in server.run.broker.sessions.items()
                                             if s.transitions.is_connected()])
    assert eventually(lambda: connected() == []), connected()
    assert server.call(lambda: len(server.service.dpop.jtis)) <= 5  # only the last round's five proofs
    assert fds_before is not None and open_fds() <= fds_before + 5


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                           | st.text(max_size=40), lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)
FIELDS = ["reply_to", "client_id", "grant_type", "device_code", "refresh_token", "scope", "token",
          "token_type_hint", "dpop", "correlation_id"]
request_bodies = st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(
    ["thermo-1", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code", "oauth/v1/reply/" + "A" * 22]),
    max_size=8)


def fuzz_answer(api: Any, endpoint: str, body: dict[str, Any]) -> None:
    reply = api.answer(endpoint, body)
    assert "dpop_nonce" in reply
    assert "error" in reply or "device_code" in reply or "access_token" in reply or set(reply) <= {
        "dpop_nonce", "correlation_id"}
    if "error" in reply:
        assert reply["error"] != "server_error", (endpoint, body, reply)


def _fuzz(server: Any, examples: int) -> None:
    api = server.run.gate.api

    @hsettings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(endpoint=st.sampled_from(["device_authorization", "token", "revoke"]), body=request_bodies)
    def check(endpoint: str, body: dict[str, Any]) -> None:
        server.call(fuzz_answer, api, endpoint, body)

    check()


@pytest.mark.parametrize("examples", [pytest.param(150, id="short"),
                                      pytest.param(5000, id="long", marks=pytest.mark.soak)])
def test_any_json_request_gets_a_wire_answer_never_a_server_error(server, examples):
    _fuzz(server, examples)
