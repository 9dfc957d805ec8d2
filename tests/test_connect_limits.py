"""Issue 3 points 10 and 11: per-source CONNECT limits and delivery QoS, each also run on amqtt's stock
`Broker` (the `stock` variants are strict xfails: should stock amqtt ever pass, the suite goes red).

| point | stock amqtt 0.12.1 Broker | ours |
|---|---|---|
| 10 CONNECT flood | every attempt is processed, however many | 21st non-device attempt in 10 s gets CONNACK 3 |
| 10 bootstrap sessions | unlimited | 51st concurrent one from a source gets CONNACK 3 |
| 10 devices | - | a device with a live token still connects from that source |
| 11 delivery QoS | the subscription's QoS | min(publish QoS, subscription QoS) |
| 11 offline queue | a QoS 0 message is queued, at the subscription's QoS | only QoS 1 and 2 are kept |
| 8 `$share/<group>/<filter>` | matched literally: never delivers | each message to one member, in turn |
| repeated SUBSCRIBE | keeps the first QoS | replaces the subscription (MQTT-3.8.4-3) |
| resumed session | keeps the first connection's clean-session flag, so drops its subscriptions | persistent |
"""

from __future__ import annotations

import base64
import logging
import socket
import struct
import time
from typing import Any

import pytest
from amqtt.broker import Broker

from authsvc.service import unverified_jti
from broker.limits import MAX_SOURCES, PER_TOKEN, ConnectLimiter
from broker.server import HardenedBroker
from tests.conftest import start_server
from tests.wire import Device, Mqtt, decode_jwt, remaining_length


class Now:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(attempts: int = 3, window: float = 10.0, bootstrap: int = 2) -> tuple[ConnectLimiter, Now]:
    now = Now()
    return ConnectLimiter(attempts, window, bootstrap, now=now), now


def test_attempts_are_limited_per_source_within_the_window() -> None:
    lim, now = limiter()
    assert [lim.attempt("10.0.0.9") for _ in range(4)] == [True, True, True, False]
    assert lim.attempt("10.0.0.8")  # another source is unaffected
    now.t += 10.5
    assert lim.attempt("10.0.0.9")


def test_refused_attempts_keep_a_hammering_source_refused() -> None:
    lim, now = limiter()
    for _ in range(3):
        lim.attempt("10.0.0.9")
    for _ in range(20):
        now.t += 1
        assert not lim.attempt("10.0.0.9")


def test_a_refunded_attempt_does_not_count() -> None:
    lim, _ = limiter()
    for _ in range(10):
        assert lim.attempt("10.0.0.9")
        lim.refund("10.0.0.9")  # a device authenticated
    assert [lim.attempt("10.0.0.9") for _ in range(4)] == [True, True, True, False]


def test_an_over_limit_token_passes_a_few_times_per_window() -> None:
    lim, now = limiter()
    assert not lim.token_pass(None)
    assert [lim.token_pass("jti-1") for _ in range(PER_TOKEN + 1)] == [True] * PER_TOKEN + [False]
    assert lim.token_pass("jti-2")  # another token
    now.t += 10.5
    assert lim.token_pass("jti-1")


def test_bootstrap_slots_are_counted_and_freed() -> None:
    lim, _ = limiter(bootstrap=2)
    lim.bootstrap_opened("a")
    lim.bootstrap_opened("a")
    assert not lim.bootstrap_allowed("a") and lim.bootstrap_allowed("b")
    lim.bootstrap_closed("a")
    assert lim.bootstrap_allowed("a")


def test_memory_stays_bounded_under_many_sources() -> None:
    lim, _ = limiter()
    for i in range(MAX_SOURCES + 500):
        lim.attempt(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        lim.token_pass(f"jti-{i}")
    assert len(lim._seen) <= MAX_SOURCES and len(lim._tokens) <= MAX_SOURCES


BROKERS = {"ours": HardenedBroker, "stock": Broker}
def stock_fails(flaw: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"stock amqtt Broker: {flaw}")


def flavours(flaw: str) -> list[Any]:
    return ["ours", pytest.param("stock", marks=stock_fails(flaw))]


QOS_CASES = [(0, 2, 0), (1, 2, 1), (0, 1, 0)]  # (published, granted, delivered)


def connect_raw(port: int, client_id: str, password: bytes | None = None) -> tuple[socket.socket, int | None]:
    """A CONNECT on a raw socket; returns the socket and the CONNACK return code (None: closed unanswered)."""
    cid = client_id.encode()
    flags = 0x02 | (0xC0 if password is not None else 0)
    payload = struct.pack("!H", len(cid)) + cid
    if password is not None:
        payload += struct.pack("!H", len(cid)) + cid + struct.pack("!H", len(password)) + password
    variable = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", 30)
    body = variable + payload
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall(b"\x10" + remaining_length(len(body)) + body)
    reply = sock.recv(4)
    return sock, (reply[3] if len(reply) == 4 else None)


def paired(srv: Any, client_id: str) -> tuple[Device, dict[str, Any], Mqtt]:
    dev = Device(srv.mqtt_port, client_id, srv.clock)
    auth = dev.authorize()
    srv.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    return dev, tokens, dev.session(tokens["access_token"])


@pytest.mark.parametrize("flavour", flavours("every CONNECT attempt is processed, however many"))
def test_connect_flood_is_refused_with_connack_3_and_devices_are_unaffected(settings, clock, caplog, flavour):
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        thermo, tokens, live = paired(srv, "thermo-1")
        _, _, panel = paired(srv, "panel-1")
        assert panel.subscribe("home/+/temperature") == [1]
        with caplog.at_level(logging.WARNING, logger="iotauth.broker"):
            codes = []
            for _ in range(25):
                sock, code = connect_raw(srv.mqtt_port, "thermo-1", b"forged-token forged-proof")
                sock.close()
                codes.append(code)
            assert set(codes[:15]) == {5}  # authentication failures while within the limit
            assert codes[-5:] == [3] * 5, codes  # then "server unavailable": try later
            sock, code = connect_raw(srv.mqtt_port, "boot-flood")
            sock.close()
            assert code == 3  # a bootstrap session from that source too
        assert "refused with CONNACK 3: more than 20 CONNECT attempts within 10 s" in caplog.text
        assert caplog.text.count("refused with CONNACK 3") == 1  # one line per window, not one per attempt

        live.publish("home/thermo-1/temperature", b"21.5")  # the live device works on
        assert panel.wait_message("home/thermo-1/temperature") == [b"21.5"]
        again = thermo.session(tokens["access_token"])  # and a device with a live token still gets in
        assert again.connack == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("flavour", flavours("bootstrap sessions per source are unlimited"))
def test_concurrent_bootstrap_sessions_per_source_are_capped_at_50(settings, clock, flavour):
    srv = start_server(settings, clock, "[mqtt]\nconnect_attempts_per_source = 500\n", broker_cls=BROKERS[flavour])
    socks = []
    try:
        lamp = Device(srv.mqtt_port, "lamp-1", srv.clock)  # its request session is one of the 50
        auth = lamp.authorize()
        srv.approve(auth["user_code"])
        tokens = lamp.poll(auth["device_code"])
        for i in range(49):
            sock, code = connect_raw(srv.mqtt_port, f"boot{i}")
            socks.append(sock)
            assert code == 0, i
        sock, code = connect_raw(srv.mqtt_port, "boot-extra")
        socks.append(sock)
        assert code == 3
        assert lamp.session(tokens["access_token"]).connack == 0  # devices are unaffected
        socks.pop(0).close()  # a slot frees when a bootstrap session ends
        sock, code = connect_when_admitted(srv.mqtt_port, "boot-again")
        socks.append(sock)
        assert code == 0
    finally:
        for sock in socks:
            sock.close()
        wait_until(lambda: not srv.call(lambda: srv.run.broker.limiter._bootstrap.get("127.0.0.1", 0) > 1))
        srv.stop()


def offline(srv: Any, client_id: str) -> None:
    """Waits until the broker has seen the client's connection end."""
    def gone() -> bool:
        stored = srv.run.broker._sessions.get(client_id)
        return stored is None or not stored[0].transitions.is_connected()
    wait_until(lambda: srv.call(gone))


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def connect_when_admitted(port: int, client_id: str, tries: int = 40) -> tuple[socket.socket, int | None]:
    """The server notices a closed socket a moment later: retry a bootstrap CONNECT until admitted."""
    for _ in range(tries):
        sock, code = connect_raw(port, client_id)
        if code == 0:
            break
        sock.close()
        time.sleep(0.05)
    return sock, code


@pytest.mark.parametrize(("flavour", "published", "granted", "delivered"), [
    *[("ours", *case) for case in QOS_CASES],
    *[pytest.param("stock", *case, marks=stock_fails("delivers at the subscription's QoS")) for case in QOS_CASES],
    ("ours", 2, 1, 1),  # stock gets this one right: the subscription's QoS is the minimum here
])
def test_delivery_qos_is_the_minimum_of_publish_and_subscription(settings, clock, flavour, published, granted,
                                                                 delivered):
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        _, _, thermo = paired(srv, "thermo-1")
        _, _, panel = paired(srv, "panel-1")
        assert panel.subscribe("home/+/temperature", qos=granted) == [granted]
        thermo.publish("home/thermo-1/temperature", b"20.0", qos=published)
        assert panel.wait_message("home/thermo-1/temperature") == [b"20.0"]
        assert panel.flags == [("home/thermo-1/temperature", delivered, False)]
    finally:
        srv.stop()


def queued_for(srv: Any, client_id: str, count: int) -> int:
    """How many messages wait for the offline session, once the broker has handled `count` broadcasts."""
    def size() -> int:
        stored = srv.run.broker._sessions.get(client_id)
        return stored[0].retained_messages.qsize() if stored else 0
    wait_until(lambda: srv.call(size) >= count, timeout=1.0)
    return srv.call(size)


@pytest.mark.parametrize("flavour", flavours("a QoS 0 message is queued for an offline session"))
def test_a_qos_0_publish_is_not_queued_for_an_offline_session(settings, clock, flavour):
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        _, _, thermo = paired(srv, "thermo-1")
        panel_dev = Device(srv.mqtt_port, "panel-1", srv.clock)
        auth = panel_dev.authorize()
        srv.approve(auth["user_code"])
        tokens = panel_dev.poll(auth["device_code"])
        panel = panel_dev.session(tokens["access_token"], clean=False)
        assert panel.subscribe("home/+/temperature", qos=1) == [1]
        panel.close()
        offline(srv, "panel-1")
        thermo.publish("home/thermo-1/temperature", b"qos0", qos=0)
        thermo.publish("home/thermo-1/temperature", b"qos1", qos=1)
        assert queued_for(srv, "panel-1", 2) == 1  # MQTT 3.1.2.4: only QoS 1 and 2 messages are kept
        back = panel_dev.session(tokens["access_token"], clean=False)
        assert back.wait_message("home/thermo-1/temperature") == [b"qos1"]
        assert back.flags == [("home/thermo-1/temperature", 1, False)]
    finally:
        srv.stop()


@pytest.mark.parametrize("flavour", flavours("a resumed session keeps its first clean-session flag"))
def test_a_session_resumed_without_clean_session_keeps_its_subscriptions_offline(settings, clock, flavour):
    """A session that began clean and is resumed with clean session 0 is persistent from then on:
    stock amqtt kept the first connection's flag and dropped it at every later disconnect."""
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        _, _, thermo = paired(srv, "thermo-1")
        panel_dev, tokens, panel = paired(srv, "panel-1")  # clean session
        panel.close()
        offline(srv, "panel-1")
        panel = panel_dev.session(tokens["access_token"], clean=False)
        assert panel.subscribe("home/+/temperature", qos=1) == [1]
        panel.close()
        offline(srv, "panel-1")
        thermo.publish("home/thermo-1/temperature", b"while away", qos=1)
        assert queued_for(srv, "panel-1", 1) == 1
        back = panel_dev.session(tokens["access_token"], clean=False)
        assert back.wait_message("home/thermo-1/temperature") == [b"while away"]
    finally:
        srv.stop()


@pytest.mark.parametrize("token", [
    "", "a.b", "a.b.c.d", "x." + "A" * 5000 + ".y", "x.!!!.y", "x.\u00e9.y",
    "x.WzFd.y",  # [1]
    "x.eyJqdGkiOjF9.y",  # {"jti":1}
    "x.eyJqdGkiOiIifQ.y",  # {"jti":""}
    "x.gA.y",  # not UTF-8
    "x." + base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode().rstrip("=") + ".y",
])
def test_unverified_jti_reads_hostile_tokens_without_raising(token: str) -> None:
    assert unverified_jti(token) is None


def test_unverified_jti_reads_the_claim() -> None:
    assert unverified_jti("x.eyJqdGkiOiJhYmMifQ.y") == "abc"


def test_a_fault_in_the_brokers_own_connect_checks_refuses_and_the_broker_serves_on(server, caplog):
    def broken(source: str) -> bool:
        raise RuntimeError("limiter broke")

    limiter = server.run.broker.limiter
    with caplog.at_level(logging.ERROR, logger="iotauth.broker"):
        server.call(setattr, limiter, "attempt", broken)
        sock, code = connect_raw(server.mqtt_port, "boot-fault")
        assert code == 5
        assert sock.recv(1) == b""  # closed by the server
        sock.close()
    assert "CONNECT check failed" in caplog.text and "RuntimeError: limiter broke" in caplog.text
    server.call(delattr, limiter, "attempt")
    sock, code = connect_raw(server.mqtt_port, "boot-after")
    sock.close()
    assert code == 0


@pytest.mark.parametrize("flavour", flavours("$share filters are matched literally and never deliver"))
def test_a_shared_subscription_delivers_each_message_to_one_member_in_turn(settings, clock, flavour):
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        srv.register("panel-2", "read:temperature", "Kitchen wall panel")
        _, _, thermo = paired(srv, "thermo-1")
        members = [paired(srv, cid)[2] for cid in ("panel-1", "panel-2")]
        for member in members:
            assert member.subscribe("$share/wall/home/+/temperature") == [1]
        for n in range(6):
            thermo.publish("home/thermo-1/temperature", str(n), qos=1)
        got = members[0].wait_for(lambda: sum(len(m.received()) for m in members) >= 6) and \
            [m.received() for m in members]
        assert got and sorted(got[0] + got[1]) == [str(n).encode() for n in range(6)]
        assert len(got[0]) == len(got[1]) == 3  # in turn
    finally:
        srv.stop()


def test_deliveries_follow_subscriptions_as_filters_come_and_go(server):
    """The broker matches exact filters by lookup and keeps a list of the wildcard ones: that list must follow
    every subscribe and unsubscribe."""
    _, _, thermo = paired(server, "thermo-1")
    _, _, panel = paired(server, "panel-1")
    topic = "home/thermo-1/temperature"

    def unsubscribe(topic_filter: str) -> None:
        _, mid = panel.client.unsubscribe(topic_filter)
        assert panel.wait_for(lambda: mid in panel.unsubacks)

    assert panel.subscribe(topic) == [1]
    thermo.publish(topic, b"1")
    assert panel.wait_message(topic, count=1) == [b"1"]
    assert panel.subscribe("home/+/temperature") == [1]  # a wildcard filter after the first delivery
    thermo.publish(topic, b"2")
    assert panel.wait_message(topic, count=3) == [b"1", b"2", b"2"]  # one copy per matching filter
    unsubscribe(topic)
    thermo.publish(topic, b"3")
    assert panel.wait_message(topic, count=4) == [b"1", b"2", b"2", b"3"]
    unsubscribe("home/+/temperature")
    thermo.publish(topic, b"4")
    assert panel.wait_for(lambda: len(panel.messages) > 4, timeout=0.5) is False


@pytest.mark.parametrize("undo", ["revoke the token", "revoke the grant", "remove the client"])
def test_connect_needs_a_live_token_grant_and_client(server, undo):
    """One database query decides all three at CONNECT: each one alone refuses."""
    dev, tokens, first = paired(server, "lamp-1")
    assert first.connack == 0
    first.close()
    svc, now = server.service, server.clock.now()
    jti = decode_jwt(tokens["access_token"])[1]["jti"]
    grant_id = server.call(lambda: svc.store.access_token(jti)["grant_id"])
    if undo == "revoke the token":
        server.call(svc.store.revoke_access_token, jti, now)
    elif undo == "revoke the grant":
        server.call(svc.store.revoke_grant, grant_id, "test", now)
    else:
        server.call(svc.remove_client, "lamp-1", now)
    assert dev.session(tokens["access_token"]).connack == 5


@pytest.mark.parametrize("flavour", flavours("a repeated SUBSCRIBE keeps the first QoS"))
def test_subscribing_again_replaces_the_subscriptions_qos(settings, clock, flavour):
    srv = start_server(settings, clock, broker_cls=BROKERS[flavour])
    try:
        _, _, thermo = paired(srv, "thermo-1")
        _, _, panel = paired(srv, "panel-1")
        assert panel.subscribe("home/+/temperature", qos=0) == [0]
        assert panel.subscribe("home/+/temperature", qos=1) == [1]  # MQTT-3.8.4-3: replaces the first
        thermo.publish("home/thermo-1/temperature", b"20.5", qos=1)
        assert panel.wait_message("home/thermo-1/temperature") == [b"20.5"]
        assert panel.flags == [("home/thermo-1/temperature", 1, False)]
    finally:
        srv.stop()


def test_a_leaked_token_without_its_key_buys_no_flood_past_the_limit(server, caplog):
    """Over the limit, a CONNECT naming a live token is verified only a few times per window: a thief holding
    the token but not the key gets CONNACK 3 after that, while the device (with its key) got in first."""
    dev, tokens, live = paired(server, "thermo-1")
    token = tokens["access_token"]
    for _ in range(20):  # use up the address's attempts
        sock, _ = connect_raw(server.mqtt_port, "thermo-1", b"forged forged")
        sock.close()
    codes = []
    for _ in range(8):
        sock, code = connect_raw(server.mqtt_port, "thermo-1", f"{token} not-a-proof".encode())
        sock.close()
        codes.append(code)
    assert codes[:PER_TOKEN] == [5] * PER_TOKEN and set(codes[PER_TOKEN:]) == {3}, codes


def test_a_will_qos_of_3_is_refused_even_with_a_valid_token(server, caplog):
    """MQTT-3.1.2-14: Will QoS 3 is malformed; amqtt admitted it and published the Will later."""
    dev, tokens, first = paired(server, "thermo-1")
    first.close()
    token = tokens["access_token"]

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    password = f"{token} {dev.connect_proof(token)}".encode()
    flags = 0x80 | 0x40 | 0x18 | 0x04 | 0x02  # username, password, Will QoS 3, Will, clean session
    body = (b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", 30) + field(b"thermo-1")
            + field(b"home/thermo-1/temperature") + field(b"gone") + field(b"thermo-1") + field(password))
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"\x10" + remaining_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x05"
    assert "Will QoS 3 is malformed" in caplog.text
