"""One MQTT 3.1.1 connection of the device, as a small blocking API over paho.

paho runs the socket in its own thread; this wrapper turns CONNACK and SUBACK
into blocking calls with timeouts, dispatches messages per subscription, and
never reconnects by itself (a reconnect would replay the CONNECT proof's
``jti``; the device decides what to do when a session is lost).

CONNACK return codes are those of MQTT 3.1.1 section 3.2.2.3; 5 is "not
authorized" (protocol section 6).
"""

from __future__ import annotations

import logging
import secrets
import string
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_sim.errors import ConnectRefused

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]

SUBACK_FAILURE = 0x80
# MQTT 3.1.1 section 3.2.2.3. paho 2 reports them as MQTT 5 reason names.
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_PAHO_NAME_TO_CODE = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}
_ALNUM = string.ascii_letters + string.digits


def connack_reason(code: int) -> str:
    return CONNACK_REASONS.get(code, f"unknown return code {code}")


def bootstrap_client_id(client_id: str) -> str:
    """A random ClientId for a bootstrap session: ``[A-Za-z0-9]`` only, 23 characters.

    MQTT 3.1.1 section 3.1.3.1 obliges servers to accept 1-23 characters of
    ``[0-9a-zA-Z]``; a prefix from the device's own id keeps broker logs readable,
    and 11 random characters (65 bits) avoid taking over another bootstrap session.
    """
    prefix = "".join(c for c in client_id if c.isascii() and c.isalnum())[:8]
    return prefix + "boot" + "".join(secrets.choice(_ALNUM) for _ in range(23 - len(prefix) - 4))


class Session:
    """A paho client plus blocking connect/subscribe/publish and a ``lost`` event."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
    ) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.lost = threading.Event()
        self.lost_reason = ""
        self._lost_callbacks: list[Callable[[Session], None]] = []
        self._closing = False
        self._connack: int | None = None
        self._connack_event = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._suback_cond = threading.Condition()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_message = self._handle_unrouted

    # -- paho callbacks (network thread) ------------------------------------
    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object,
                        reason_code: object, properties: object) -> None:
        self._connack = _PAHO_NAME_TO_CODE.get(str(reason_code), 255)
        self._connack_event.set()

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                           reason_code: object, properties: object) -> None:
        self.lost_reason = "closed by client" if self._closing else f"connection lost ({reason_code})"
        first = not self.lost.is_set()
        self.lost.set()
        self._connack_event.set()
        with self._suback_cond:
            self._suback_cond.notify_all()
        if first and self._connack == 0 and not self._closing:
            for callback in self._lost_callbacks:
                callback(self)

    def _handle_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                          reason_codes: list[ReasonCode], properties: Properties) -> None:
        with self._suback_cond:
            self._subacks[mid] = [_suback_code(rc) for rc in reason_codes]
            self._suback_cond.notify_all()

    def _handle_unrouted(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        log.debug("%s: message on %s matches no handler", self.client_id, message.topic)

    # -- blocking API (caller's thread) -------------------------------------
    def when_lost(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` (on paho's thread) if an open session drops without close()."""
        self._lost_callbacks.append(callback)

    def open(self, timeout: float = 10.0) -> None:
        """Connect and wait for CONNACK; raises ConnectRefused, TimeoutError or OSError."""
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as exc:
            raise ConnectionError(f"cannot reach the MQTT broker at {self.host}:{self.port}: "
                                  f"{exc.strerror or exc}") from exc
        self._client.loop_start()
        if not self._connack_event.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout:g} s")
        code = self._connack
        if code != 0:
            self.close()
            if code is None:
                raise ConnectionError(f"{self.host}:{self.port} closed the connection before CONNACK")
            raise ConnectRefused(code, connack_reason(code))

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1,
                  timeout: float = 10.0) -> int:
        """Subscribe and wait for SUBACK: the granted QoS, or 0x80 when refused."""
        self._client.message_callback_add(topic_filter, _adapt(handler))
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"subscribe to {topic_filter} failed: {mqtt.error_string(result)}")
        with self._suback_cond:
            done = self._suback_cond.wait_for(lambda: mid in self._subacks or self.lost.is_set(), timeout)
            codes = self._subacks.pop(mid, None)
        if codes is None:
            raise TimeoutError(f"no SUBACK for {topic_filter}" if not done else self.lost_reason)
        if codes[0] == SUBACK_FAILURE:
            self._client.message_callback_remove(topic_filter)
        return codes[0]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, wait: float | None = None) -> None:
        """Publish (never retained); with ``wait``, block until PUBACK or raise TimeoutError."""
        info = self._client.publish(topic, payload, qos=qos, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if wait is not None:
            info.wait_for_publish(wait)
            if not info.is_published():
                raise TimeoutError(f"no PUBACK for {topic} within {wait:g} s")

    @property
    def connected(self) -> bool:
        return self._connack == 0 and not self.lost.is_set()

    def close(self) -> None:
        """Send DISCONNECT (if connected) and stop the network thread. Idempotent."""
        self._closing = True
        if self._connack == 0 and not self.lost.is_set():
            self._client.disconnect()
        self._client.loop_stop()
        self.lost.set()
        if not self.lost_reason:
            self.lost_reason = "closed by client"


def _suback_code(reason_code: ReasonCode) -> int:
    return reason_code.value if isinstance(reason_code.value, int) else SUBACK_FAILURE


def _adapt(handler: Handler) -> Callable[[mqtt.Client, object, mqtt.MQTTMessage], None]:
    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            handler(message.topic, bytes(message.payload))
        except Exception:  # a bad message must not kill paho's network thread
            log.exception("handler for %s failed", message.topic)
    return on_message
