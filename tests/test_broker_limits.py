"""Protocol section 6 limits at the real broker: CONNECT timeout, keep-alive, packet size, `$` topics."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from tests.conftest import start_server
from tests.wire import Device, Mqtt


def connect_packet(client_id: str, keep_alive: int) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keep_alive)
    payload = struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(variable) + len(payload)]) + variable + payload


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the socket, or None if it stayed open."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


@pytest.fixture
def quick_server(settings, clock):
    srv = start_server(settings, clock, "[mqtt]\nconnect_timeout = 1\n")
    yield srv
    srv.stop()


def test_socket_without_connect_is_closed_after_the_connect_timeout(quick_server):
    with socket.create_connection(("127.0.0.1", quick_server.mqtt_port)) as sock:
        elapsed = closed_within(sock, 5)
    assert elapsed is not None and elapsed >= 0.9


def test_silent_client_is_closed_after_one_and_a_half_keep_alives(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("silent1", keep_alive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        elapsed = closed_within(sock, 5)
    assert elapsed is not None and 1.0 <= elapsed < 4


def test_client_that_pings_stays_connected(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("pinger1", keep_alive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        for _ in range(4):
            time.sleep(0.5)
            sock.sendall(b"\xc0\x00")  # PINGREQ
            assert sock.recv(2) == b"\xd0\x00"  # PINGRESP


def test_packet_over_64_kib_closes_the_connection(server):
    m = Mqtt(server.mqtt_port, "bigsender")
    assert m.connect() == 0
    m.client.publish("oauth/v1/token", b"x" * (70 * 1024), qos=0)
    assert m.disconnected.wait(5)
    m.client.loop_stop()


def test_request_over_16_kib_is_dropped_and_the_session_keeps_working(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    big = json.dumps({"reply_to": dev.reply_to, "client_id": "thermo-1", "pad": "x" * 17000})
    assert dev.raw_request("device_authorization", big, timeout=1.0) is None
    assert not dev.boot.disconnected.is_set()
    assert "user_code" in dev.request("device_authorization")


def paired_session(server, client_id):
    dev = Device(server.mqtt_port, client_id, server.clock)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    return dev, dev.session(dev.poll(auth["device_code"])["access_token"])


def test_publish_to_a_dollar_topic_is_dropped_and_the_session_keeps_working(server):
    _, thermo = paired_session(server, "thermo-1")
    _, panel = paired_session(server, "panel-1")
    assert panel.subscribe("home/+/temperature") == [1]
    thermo.publish("$SYS/broker/uptime", b"0")
    thermo.publish("home/thermo-1/temperature", b'{"celsius": 20}')
    assert panel.wait_message("home/thermo-1/temperature") == [b'{"celsius": 20}']
    assert not thermo.disconnected.is_set()
    assert panel.subscribe("$SYS/#", "#") == [0x80, 0x80]


def test_a_second_connect_with_the_same_client_id_closes_the_first_and_revocation_reaches_both(server):
    thermo = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = thermo.authorize()
    server.approve(auth["user_code"])
    tokens = thermo.poll(auth["device_code"])
    first = thermo.session(tokens["access_token"])
    second = thermo.session(tokens["access_token"])
    assert (first.connack, second.connack) == (0, 0)
    assert first.disconnected.wait(2), "the first connection outlived the takeover (MQTT-3.1.4-2)"
    server.call(server.service.revoke_client, "thermo-1", server.clock.now())
    assert second.disconnected.wait(2)


def test_bootstrap_with_an_empty_client_id_is_assigned_one(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("", keep_alive=30))
        assert sock.recv(4) == b"\x20\x02\x00\x00"


@pytest.mark.parametrize("client_id", ["a/b", "+", "#", "l\u00e4mp", "$sys"])
def test_bootstrap_with_an_unsafe_client_id_gets_connack_2(server, client_id):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet(client_id, keep_alive=30))
        assert sock.recv(4) == b"\x20\x02\x00\x02"


def test_authenticated_connect_with_an_unsafe_client_id_gets_connack_5(server):
    thermo = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = thermo.authorize()
    server.approve(auth["user_code"])
    tokens = thermo.poll(auth["device_code"])
    assert thermo.session(tokens["access_token"], client_id="a/thermo-1").connack == 5


@pytest.mark.parametrize("clean", [False, True], ids=["take over", "wipe"])
def test_bootstrap_cannot_touch_an_offline_device_session_or_its_queued_messages(server, clean):
    thermo = Device(server.mqtt_port, "thermo-1", server.clock)
    auth = thermo.authorize()
    server.approve(auth["user_code"])
    tokens = thermo.poll(auth["device_code"])
    first = thermo.session(tokens["access_token"], clean=False)
    assert first.subscribe("home/thermo-1/power/set") == [1]
    first.close()
    _, panel = paired_session(server, "panel-1")
    panel.publish("home/thermo-1/power/set", b"secret-on")
    attacker = Mqtt(server.mqtt_port, "thermo-1", clean=clean)
    assert attacker.connect() == 2
    assert attacker.received() == []
    back = thermo.session(tokens["access_token"], clean=False)
    assert back.connack == 0
    assert back.wait_message("home/thermo-1/power/set") == [b"secret-on"]
    assert back.flags == [("home/thermo-1/power/set", 1, False)]  # queued, not retained (MQTT-3.3.1-9)


def test_a_new_session_gets_retained_messages_only_for_its_own_subscriptions(server):
    watcher = Mqtt(server.mqtt_port, "watcher1")
    assert watcher.connect() == 0
    watcher.subscribe("oauth/v1/jwks")
    assert watcher.wait_message("oauth/v1/jwks")
    newcomer = Mqtt(server.mqtt_port, "newcomer1")
    assert newcomer.connect() == 0
    assert newcomer.subscribe("oauth/v1/reply/AAAAAAAAAAAAAAAAAAAAAAAA") == [1]
    assert newcomer.wait_for(lambda: newcomer.received("oauth/v1/jwks"), timeout=1.0) == []
    assert len(watcher.received("oauth/v1/jwks")) == 1


def test_a_packet_that_does_not_decode_closes_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("malformed1", keep_alive=30))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        topic = b"home/+/power/set"  # wildcards are not allowed in a PUBLISH topic
        body = struct.pack("!H", len(topic)) + topic + b"\x00\x01" + b"\xc0\x00"  # payload: a PINGREQ
        sock.sendall(bytes([0x32, len(body)]) + body)
        sock.settimeout(3)
        assert sock.recv(16) == b""  # closed; the payload was not read as a PINGREQ (no PINGRESP)


def test_a_half_sent_packet_is_closed_after_the_keep_alive(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("halfsent1", keep_alive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(b"\x30\x64\x00\x0eoauth/v1/token")  # says 100 bytes, sends 18
        elapsed = closed_within(sock, 6)
    assert elapsed is not None


def test_bootstrap_sessions_keep_nothing_for_a_later_reconnect(server):
    reply = "oauth/v1/reply/" + "P" * 24
    first = Mqtt(server.mqtt_port, "persist1", clean=False)
    assert first.connect() == 0
    assert first.subscribe(reply) == [1]
    first.close()
    other = Device(server.mqtt_port, "thermo-1", server.clock)
    other.boot.publish("oauth/v1/device_authorization",
                       json.dumps({"reply_to": reply, "client_id": "thermo-1"}))
    assert "user_code" in other.request("device_authorization")  # the first reply was sent by now
    again = Mqtt(server.mqtt_port, "persist1", clean=False)
    assert again.connect() == 0
    assert again.wait_for(lambda: again.received(), timeout=1.0) == []
