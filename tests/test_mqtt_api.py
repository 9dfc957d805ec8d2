"""The MQTT request/response envelope (protocol.md section 3) on a real broker: drops, errors, echo, nonces.

Every test talks to the running server over real MQTT (the `server` fixture). A dropped request has no
reply to wait for, so each one is followed by a good request: its reply is the sync point, after which the
drop counter must have moved and nothing else may have arrived.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from authsvc import metrics
from tests.wire import PREFIX, Device, make_proof

GOOD_ID = "A" * 22


@pytest.fixture
def dev(server: Any) -> Any:
    device = Device(server.mqtt_port, "lamp-1", server.clock)
    yield device
    device.close()


def dropped(endpoint: str) -> float:
    return metrics.REGISTRY.get_sample_value("iotauth_requests_dropped_total", {"endpoint": endpoint}) or 0.0


def nonce_now(server: Any) -> str:
    return server.call(server.service.current_nonce, server.clock.now())


def body(dev: Any, **fields: Any) -> dict[str, Any]:
    return {"reply_to": dev.reply_to, "client_id": dev.client_id, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (case id, endpoint, payload builder (device) -> bytes, retain flag)
DROP_CASES: list[Any] = [
    ("not JSON", "token", lambda d: b"grant_type=refresh_token", False),
    ("not UTF-8", "token", lambda d: b'{"reply_to": "\xff\xfe"}', False),
    ("a JSON array", "token", lambda d: json.dumps([body(d)]).encode(), False),
    ("a JSON string", "device_authorization", lambda d: json.dumps(d.reply_to).encode(), False),
    ("JSON nested 8000 deep", "token",
     lambda d: f'{{"reply_to": "{d.reply_to}", "x": {nested(8000)}}}'.encode(), False),
    ("reply_to missing", "device_authorization", lambda d: json.dumps({"client_id": "lamp-1"}).encode(),
     False),
    ("reply_to a number", "device_authorization", lambda d: json.dumps(body(d, reply_to=7)).encode(), False),
    ("reply_to outside the prefix", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"home/reply/{GOOD_ID}")).encode(), False),
    ("reply_to under another version's prefix", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"oauth/v2/reply/{GOOD_ID}")).encode(), False),
    ("reply_to the token topic", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/token")).encode(), False),
    ("reply_to with +", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/reply/+")).encode(), False),
    ("reply_to with #", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/reply/#")).encode(), False),
    ("reply id with + inside", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/reply/{GOOD_ID}+")).encode(), False),
    ("reply id of 21 characters", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/reply/{'A' * 21}")).encode(), False),
    ("reply id of 65 characters", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{PREFIX}/reply/{'A' * 65}")).encode(), False),
    ("reply_to one level deeper", "device_authorization",
     lambda d: json.dumps(body(d, reply_to=f"{d.reply_to}/x")).encode(), False),
    ("over 16 KiB", "device_authorization", lambda d: padded(body(d), 16 * 1024 + 1), False),
    ("published with the retain flag", "device_authorization", lambda d: json.dumps(body(d)).encode(), True),
    ("NaN, which is not JSON", "device_authorization",
     lambda d: f'{{"reply_to": "{d.reply_to}", "correlation_id": NaN}}'.encode(), False),
    ("-Infinity in an unknown field", "token",
     lambda d: f'{{"reply_to": "{d.reply_to}", "x": -Infinity}}'.encode(), False),
]


def padded(fields: dict[str, Any], size: int) -> bytes:
    raw = json.dumps(fields | {"pad": ""}).encode()
    out = json.dumps(fields | {"pad": "x" * (size - len(raw))}).encode()
    assert len(out) == size
    return out


@pytest.mark.parametrize("endpoint, payload, retain",
                         [pytest.param(e, p, r, id=i) for i, e, p, r in DROP_CASES])
def test_request_that_cannot_be_answered_is_dropped_and_counted(server, dev, endpoint, payload, retain):
    before = dropped(endpoint)
    dev.boot.publish(f"{PREFIX}/{endpoint}", payload(dev), qos=1, retain=retain)
    reply = dev.request(endpoint, correlation_id="after-the-drop", grant_type="refresh_token",
                        refresh_token="x", dpop=True)
    assert reply["correlation_id"] == "after-the-drop"  # the service keeps answering
    assert dropped(endpoint) == before + 1
    assert len(dev.boot.received(dev.reply_to)) == 1  # nothing was sent for the dropped request


def test_retained_request_never_becomes_a_retained_message(server, dev):
    dev.boot.publish(f"{PREFIX}/device_authorization", json.dumps(body(dev)), qos=1, retain=True)
    dev.boot.publish(f"{PREFIX}/token", json.dumps(body(dev, grant_type="refresh_token")), qos=1, retain=True)
    assert dev.request("device_authorization")["user_code"]  # sync point
    retained = server.call(lambda: dict(server.run.broker.retained_messages))
    assert sorted(t for t in retained if t.startswith(f"{PREFIX}/")) == [f"{PREFIX}/jwks"]


# (case id, endpoint, fields, expected error or "ok", correlation_id expected in the reply)
ANSWER_CASES: list[Any] = [
    ("client_id a number", "device_authorization", {"client_id": 5}, "invalid_request", None),
    ("scope a list", "device_authorization", {"scope": ["device:power"]}, "invalid_request", None),
    ("correlation_id of 65 characters", "device_authorization", {"correlation_id": "c" * 65},
     "invalid_request", "c" * 65),
    ("correlation_id a number", "device_authorization", {"correlation_id": 17}, "invalid_request", 17),
    ("correlation_id null", "device_authorization", {"correlation_id": None}, "invalid_request", None),
    ("correlation_id of 64 characters", "device_authorization", {"correlation_id": "c" * 64}, "ok", "c" * 64),
    ("correlation_id echoed on success", "device_authorization", {"correlation_id": "req-1"}, "ok", "req-1"),
    ("correlation_id echoed on an error", "device_authorization",
     {"correlation_id": "req-2", "client_id": "x/y"}, "invalid_client", "req-2"),
    ("unknown client", "device_authorization", {"client_id": "fridge-9"}, "invalid_client", None),
    ("unknown grant_type", "token", {"grant_type": "password", "correlation_id": "g"},
     "unsupported_grant_type", "g"),
    ("grant_type missing", "token", {}, "invalid_request", None),
    ("grant_type a list", "token", {"grant_type": ["refresh_token"]}, "invalid_request", None),
    ("refresh_token a number", "token", {"grant_type": "refresh_token", "refresh_token": 1},
     "invalid_request", None),
    ("token request without a proof", "token", {"grant_type": "refresh_token", "refresh_token": "x"},
     "invalid_dpop_proof", None),
    ("revoke: token missing", "revoke", {}, "invalid_request", None),
    ("revoke: unknown token", "revoke", {"token": "not-a-token"}, "ok", None),
    # a \ud800 escape is valid JSON syntax but no UTF-8 text: it once reached the token hash as server_error
    ("revoke: token a lone surrogate", "revoke", {"token": "\ud800"}, "invalid_request", None),
    ("lone surrogate in a key of an unknown field", "device_authorization", {"x": {"\udc00": 1}},
     "invalid_request", None),
    ("correlation_id a lone surrogate, echoed", "device_authorization", {"correlation_id": "c\udc00"},
     "invalid_request", "c\udc00"),
]


@pytest.mark.parametrize("endpoint, fields, expected, echoed",
                         [pytest.param(e, f, x, c, id=i) for i, e, f, x, c in ANSWER_CASES])
def test_request_with_a_usable_reply_to_gets_an_answer_with_the_current_nonce(server, dev, endpoint, fields,
                                                                              expected, echoed):
    reply = dev.raw_request(endpoint, json.dumps(body(dev) | fields))
    assert reply is not None
    assert reply.get("error", "ok") == expected, reply
    if expected != "ok":
        assert set(reply) <= {"error", "error_description", "correlation_id", "dpop_nonce"}
        assert isinstance(reply["error_description"], str)
    assert reply.get("correlation_id") == echoed
    assert ("correlation_id" in reply) == ("correlation_id" in fields)  # echoed whenever the request had one
    assert reply["dpop_nonce"] == nonce_now(server)


def test_request_of_exactly_16_kib_is_answered(server, dev):
    reply = dev.raw_request("device_authorization", padded(body(dev, correlation_id="big"), 16 * 1024))
    assert reply is not None and reply["correlation_id"] == "big" and reply["user_code"]


def test_every_reply_of_a_whole_pairing_carries_the_nonce(server, dev):
    replies = [dev.authorize()]
    replies.append(dev.poll(replies[0]["device_code"]))
    server.approve(replies[0]["user_code"])
    replies.append(dev.poll(replies[0]["device_code"]))
    replies.append(dev.refresh(replies[-1]["refresh_token"]))
    replies.append(dev.request("revoke", token=replies[-1]["refresh_token"], dpop=True))
    assert [r.get("error", "ok") for r in replies] == ["ok", "authorization_pending", "ok", "ok", "ok"]
    assert replies[-1] == {"dpop_nonce": nonce_now(server)}  # revoke: {} plus the nonce
    assert all(r["dpop_nonce"] == nonce_now(server) for r in replies)


def test_device_without_a_clock_uses_the_nonce_of_the_last_reply(server, dev):
    first = dev.request("device_authorization", dpop=dev.proof("device_authorization", iat=0))
    assert first["error"] == "use_dpop_nonce"
    server.clock.advance(250)  # maybe the next nonce step: the previous step's nonce still counts
    stale = dev.proof("device_authorization", iat=server.clock.now() - 3600, nonce=first["dpop_nonce"])
    reply = dev.request("device_authorization", dpop=stale)
    assert reply.get("user_code"), reply
    made_up = dev.proof("device_authorization", iat=server.clock.now() - 3600,
                        nonce="AAAA" + first["dpop_nonce"])
    refused = dev.request("device_authorization", dpop=made_up)
    assert refused["error"] == "use_dpop_nonce" and refused["dpop_nonce"] == nonce_now(server)


def test_a_nonce_two_steps_old_gets_a_fresh_nonce(server, dev):
    old = dev.request("device_authorization")["dpop_nonce"]
    server.clock.advance(2 * server.settings.nonce_step)
    stale = make_proof(dev.key, "PUBLISH", f"{PREFIX}/device_authorization", iat=0, nonce=old)
    reply = dev.request("device_authorization", dpop=stale)
    assert reply["error"] == "use_dpop_nonce"
    assert reply["dpop_nonce"] != old and reply["dpop_nonce"] == nonce_now(server)
