"""A test-side MQTT device built from protocol.md only: paho, joserfc, JSON. Fine control for bad inputs."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import struct
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from joserfc import jws
from joserfc.jwk import ECKey
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "oauth/v1"
AUDIENCE = "mqtt://localhost:1883"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back to the 3.1.1 return codes
V5_TO_V311_CONNACK = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"  # raw CONNACK, return code 0


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" encoding (1-4 bytes, 3.1.1 section 2.2.3)."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keep_alive: int) -> bytes:
    """A raw MQTT 3.1.1 CONNECT: clean session, no username, password or Will (a bootstrap CONNECT)."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keep_alive)
    payload = struct.pack("!H", len(cid)) + cid
    return b"\x10" + remaining_length(len(variable) + len(payload)) + variable + payload


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


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ath(token: str) -> str:
    return b64u(hashlib.sha256(token.encode()).digest())


def make_proof(key: ECKey, htm: str, htu: str, *, iat: float, nonce: str | None = None, token: str | None = None,
               jti: str | None = None, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
               alg: str = "ES256") -> str:
    h = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    h.update(header or {})
    c: dict[str, Any] = {"jti": jti or uuid.uuid4().hex, "iat": int(iat), "htm": htm, "htu": htu}
    if nonce is not None:
        c["nonce"] = nonce
    if token is not None:
        c["ath"] = ath(token)
    c.update(claims or {})
    return jws.serialize_compact({k: v for k, v in h.items() if v is not None}, json.dumps(c).encode(), key,
                                 algorithms=[alg])


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(body)))


class Mqtt:
    """A paho client that records messages and waits on events, never on sleep."""

    def __init__(self, port: int, client_id: str = "", *, username: str | None = None,
                 password: str | None = None, will: tuple[str, bytes] | None = None, clean: bool = True,
                 keepalive: int = 60) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=0)
        self.messages: list[tuple[str, bytes]] = []
        self.flags: list[tuple[str, int, bool]] = []  # (topic, qos, retain) of each delivery
        self.cond = threading.Condition()
        self.connack: int | None = None
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[int]] = {}
        self.acks: set[int] = set()
        self.unsubacks: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_unsubscribe = self._on_unsubscribe
        self.port = port
        self.keepalive = keepalive

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        with self.cond:
            value = rc.value if hasattr(rc, "value") else int(rc)
            self.connack = V5_TO_V311_CONNACK.get(value, value)
            self.cond.notify_all()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnected.set()
        with self.cond:
            self.cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.flags.append((msg.topic, msg.qos, bool(msg.retain)))
            self.cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any = None) -> None:
        with self.cond:
            self.subacks[mid] = [x.value if hasattr(x, "value") else int(x) for x in codes]
            self.cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any = None, props: Any = None) -> None:
        with self.cond:
            self.acks.add(mid)
            self.cond.notify_all()

    def _on_unsubscribe(self, c: Any, u: Any, mid: int, codes: Any = None, props: Any = None) -> None:
        with self.cond:
            self.unsubacks.add(mid)
            self.cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return value
                self.cond.wait(remaining)

    def connect(self, timeout: float = 5.0) -> int | None:
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self.wait_for(lambda: self.connack is not None or self.disconnected.is_set(), timeout)
        return self.connack

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        return self.wait_for(lambda: self.subacks.get(mid))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            self.wait_for(lambda: info.mid in self.acks or self.disconnected.is_set())

    def received(self, topic: str | None = None) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if topic is None or t == topic]

    def wait_message(self, topic: str, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        return self.wait_for(lambda: len(self.received(topic)) >= count and self.received(topic), timeout) or []

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """A device speaking the protocol: bootstrap session for requests, authenticated session for data."""

    def __init__(self, port: int, client_id: str, clock: Any, key: ECKey | None = None) -> None:
        self.port = port
        self.client_id = client_id
        self.clock = clock
        self.key = key or ECKey.generate_key("P-256", private=True)
        self.reply_to = f"{PREFIX}/reply/{secrets.token_urlsafe(16)}"
        self.boot = Mqtt(port, f"boot{secrets.token_hex(6)}")
        assert self.boot.connect() == 0
        assert self.boot.subscribe(self.reply_to) == [1]
        self.nonce: str | None = None
        self.sessions: list[Mqtt] = []

    def proof(self, endpoint: str, **kw: Any) -> str:
        kw.setdefault("iat", self.clock.now())
        return make_proof(kw.pop("key", self.key), "PUBLISH", f"{PREFIX}/{endpoint}", **kw)

    def raw_request(self, endpoint: str, payload: bytes | str, *, retain: bool = False,
                    timeout: float = 5.0) -> dict[str, Any] | None:
        before = len(self.boot.received(self.reply_to))
        self.boot.publish(f"{PREFIX}/{endpoint}", payload, retain=retain)
        got = self.boot.wait_for(lambda: len(self.boot.received(self.reply_to)) > before, timeout)
        if not got:
            return None
        reply = json.loads(self.boot.received(self.reply_to)[before])
        self.nonce = reply.get("dpop_nonce", self.nonce)
        return reply

    def request(self, endpoint: str, *, dpop: bool | str = False, **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"reply_to": self.reply_to, "client_id": self.client_id, **params}
        if dpop is True:
            body["dpop"] = self.proof(endpoint)
        elif isinstance(dpop, str):
            body["dpop"] = dpop
        reply = self.raw_request(endpoint, json.dumps(body))
        assert reply is not None, f"no reply on {endpoint}"
        return reply

    def authorize(self, scope: str | None = None, bind: bool = True) -> dict[str, Any]:
        params = {} if scope is None else {"scope": scope}
        return self.request("device_authorization", dpop=bind, **params)

    def poll(self, device_code: str, **kw: Any) -> dict[str, Any]:
        return self.request("token", dpop=kw.pop("dpop", True), grant_type=DEVICE_CODE_GRANT,
                            device_code=device_code, **kw)

    def refresh(self, refresh_token: str, **kw: Any) -> dict[str, Any]:
        return self.request("token", dpop=kw.pop("dpop", True), grant_type="refresh_token",
                            refresh_token=refresh_token, **kw)

    def connect_proof(self, token: str, **kw: Any) -> str:
        kw.setdefault("iat", self.clock.now())
        return make_proof(kw.pop("key", self.key), "CONNECT", kw.pop("htu", AUDIENCE), token=token, **kw)

    def session(self, token: str, *, password: str | None = None, client_id: str | None = None,
                username: str | None = None, **kw: Any) -> Mqtt:
        cid = client_id or self.client_id
        pw = password if password is not None else f"{token} {self.connect_proof(token)}"
        m = Mqtt(self.port, cid, username=username or cid, password=pw, **kw)
        m.connect()
        self.sessions.append(m)
        return m

    def close(self) -> None:
        for m in self.sessions:
            m.close()
        self.boot.close()
