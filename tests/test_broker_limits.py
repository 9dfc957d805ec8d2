"""Protocol section 6 limits at the real broker that are not hardening points of issue 3.

The hardening points themselves (CONNECT timeout, keep-alive, packet size, `$` topics, identity, retained
messages, takeover), each shown failing on stock amqtt, are in test_broker_hardening.py.
"""

from __future__ import annotations

import json
import socket
import struct
import time

from tests.wire import CONNACK_ACCEPTED, Device, Mqtt, closed_within, connect_packet


def test_client_that_pings_stays_connected(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("pinger1", keep_alive=1))
        assert sock.recv(4) == CONNACK_ACCEPTED
        for _ in range(4):
            time.sleep(0.5)
            sock.sendall(b"\xc0\x00")  # PINGREQ
            assert sock.recv(2) == b"\xd0\x00"  # PINGRESP


def test_request_over_16_kib_is_dropped_and_the_session_keeps_working(server):
    dev = Device(server.mqtt_port, "thermo-1", server.clock)
    big = json.dumps({"reply_to": dev.reply_to, "client_id": "thermo-1", "pad": "x" * 17000})
    assert dev.raw_request("device_authorization", big, timeout=1.0) is None
    assert not dev.boot.disconnected.is_set()
    assert "user_code" in dev.request("device_authorization")


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
        assert sock.recv(4) == CONNACK_ACCEPTED


def test_a_packet_that_does_not_decode_closes_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("malformed1", keep_alive=30))
        assert sock.recv(4) == CONNACK_ACCEPTED
        topic = b"home/+/power/set"  # wildcards are not allowed in a PUBLISH topic
        body = struct.pack("!H", len(topic)) + topic + b"\x00\x01" + b"\xc0\x00"  # payload: a PINGREQ
        sock.sendall(bytes([0x32, len(body)]) + body)
        sock.settimeout(3)
        assert sock.recv(16) == b""  # closed; the payload was not read as a PINGREQ (no PINGRESP)


def test_a_half_sent_packet_is_closed_after_the_keep_alive(server):
    with socket.create_connection(("127.0.0.1", server.mqtt_port)) as sock:
        sock.sendall(connect_packet("halfsent1", keep_alive=1))
        assert sock.recv(4) == CONNACK_ACCEPTED
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
