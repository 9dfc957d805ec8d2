"""The amqtt broker, hardened where a plugin alone cannot be (../shared/amqtt-notes.md).

`HardenedBroker` overrides, each for a stated reason:
- `_initialize_client_session`: wait at most `connect_timeout` for CONNECT, and authenticate BEFORE any
  existing session is touched (stock amqtt wipes or takes over a victim's session first, flaw 1); a
  bootstrap CONNECT may not take over or wipe a device's session, live or offline (CONNACK 2).
- `_authenticate`: returns the decision already taken above, so the plugin runs once per CONNECT
  (a second run would see its own proof as a replay).
- `retain_message`: a device's publish never becomes a retained message under the protocol prefix.
- `_publish_retained_messages_for_subscription`: retained messages obey the RECEIVE check and go only
  to the session's own subscriptions (flaw 2); `_publish_session_retained_messages` applies the same
  check to messages queued while a persistent session was offline.
- `stream_connected`: every socket reads through `PacketLimitReader`, so a packet over the maximum size
  closes its connection before its body is buffered (no maximum exists in stock amqtt, flaw 3).
- `KeepAliveHandler`: a session silent for 1.5 x its keep-alive is closed (stock amqtt only logs it);
  a bootstrap session asking for keep-alive 0 gets the bootstrap default instead.
- `_handle_message_delivery`: a client PUBLISH to a `$` topic is dropped and logged; stock amqtt
  leaves the session half-dead.
- `_StrictPacket` (installed into amqtt's reader): a packet that does not decode closes the connection;
  stock amqtt skipped it and parsed the rest of it as further packets.
- Bootstrap sessions are always clean, so nothing (a reply with a device code) waits for whoever
  reconnects with the same ClientId.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol import handler as _amqtt_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from authsvc import metrics
from authsvc.clock import Clock
from authsvc.service import AuthService
from broker.gate import HANDLER, Gate, close_connection
from broker.plugin import IotAuthPlugin, info

log = logging.getLogger("iotauth.broker")

ADMITTED = "iotauth.admitted"
BOOTSTRAP_KEEPALIVE = 60  # seconds, for a bootstrap session that asks for none


class PacketTooLarge(Exception):
    """A client sent a packet larger than the broker's maximum packet size."""


class PacketLimitReader(ReaderAdapter):
    """Reads one whole MQTT packet at a time from the socket, refusing any larger than `limit` bytes."""

    def __init__(self, inner: ReaderAdapter, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._buffer = bytearray()

    async def _next_packet(self) -> None:
        head = bytearray(await self._inner.read(1))
        remaining, multiplier = 0, 1
        for _ in range(4):
            byte = (await self._inner.read(1))[0]
            head.append(byte)
            remaining += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        if len(head) + remaining > self._limit:
            raise PacketTooLarge(f"{len(head) + remaining} byte packet exceeds the {self._limit} byte maximum")
        body = await self._inner.read(remaining) if remaining else b""
        self._buffer = head + body

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer:
            await self._next_packet()
        n = len(self._buffer) if n < 0 else n
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class KeepAliveHandler(BrokerProtocolHandler):
    """Closes the connection when the client has been silent for longer than the read timeout."""

    def handle_read_timeout(self) -> None:
        log.warning("closing %r: silent for longer than 1.5 x its keep-alive",
                    self.session.client_id if self.session else None)
        asyncio.ensure_future(close_connection(self))


class MalformedPacket(Exception):
    """A packet that does not decode: MQTT 3.1.1 (4.8) says the server closes the connection."""


class _StrictPacket:
    """Wraps a packet class so a decoding error ends the connection instead of being skipped.

    amqtt's reader logs an MQTTError as "Message discarded" and goes on reading, so the rest of the
    bad packet (a refused PUBLISH's payload, say) was parsed as further packets. Any other exception
    ends amqtt's reader loop, which closes the connection."""

    def __init__(self, packet_cls: Any) -> None:
        self.packet_cls = packet_cls

    async def from_stream(self, reader: Any, fixed_header: Any = None) -> Any:
        try:
            return await self.packet_cls.from_stream(reader, fixed_header=fixed_header)
        except MQTTError as exc:
            raise MalformedPacket(str(exc)) from exc


def _install_strict_packets() -> None:
    original = _amqtt_handler.packet_class
    if getattr(original, "iotauth_strict", False):
        return

    def strict_packet_class(fixed_header: Any) -> Any:
        return _StrictPacket(original(fixed_header))

    strict_packet_class.iotauth_strict = True  # type: ignore[attr-defined]
    _amqtt_handler.packet_class = strict_packet_class


_install_strict_packets()


def read_timeout(keep_alive: int, bootstrap: bool) -> int:
    """MQTT 3.1.1 3.1.2.10: the server closes a connection silent for 1.5 x the keep-alive."""
    if keep_alive <= 0:
        keep_alive = BOOTSTRAP_KEEPALIVE if bootstrap else 0
    return math.ceil(keep_alive * 1.5)


def broker_config(host: str, port: int) -> dict[str, Any]:
    # An explicit plugin list: the default one loads a packet logger that writes CONNECT passwords (tokens).
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"broker.plugin.IotAuthPlugin": {}},
    }


class HardenedBroker(Broker):
    connect_timeout: float = 10.0
    max_packet_size: int = 65536

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        limited = PacketLimitReader(StreamReaderAdapter(reader), self.max_packet_size)
        await self._client_connected(listener_name, limited, StreamWriterAdapter(writer))

    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        message = wait_deliver.result()
        if message is not None and isinstance(message.topic, str) and message.topic.startswith("$"):
            log.warning("dropped a PUBLISH from %r to %r: clients never publish to $ topics",
                        client_session.client_id, message.topic[:120])
            metrics.ACL_DENIED.labels(action="publish").inc()
            return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await asyncio.wait_for(
                KeepAliveHandler.init_from_connect(reader, writer, self.plugins_manager), self.connect_timeout)
        except TimeoutError:
            log.warning("no CONNECT from %s:%s within %.0f s; closing", remote_address, remote_port,
                        self.connect_timeout)
            await writer.close()
            raise AMQTTError("CONNECT timeout") from None
        except (AMQTTError, MQTTError, NoDataError, PacketTooLarge) as exc:
            log.warning("bad first packet from %s:%s: %s", remote_address, remote_port, exc)
            await writer.close()
            raise AMQTTError(exc) from exc

        code = await self._admit(session)
        if code:
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused with return code {code}")
        session.attributes[ADMITTED] = True
        meta = info(session)
        if meta is not None and meta.kind == "bootstrap":
            session.clean_session = True  # nothing is kept for a password-less session: no queued replies
        session.keep_alive = read_timeout(session.keep_alive, bootstrap=meta is not None and meta.kind == "bootstrap")

        previous = self._sessions.get(session.client_id or "")
        if previous is not None and previous[0].transitions.is_connected():
            # MQTT-3.1.4-2: the previous connection of this ClientId is closed. Stock amqtt keeps it open
            # when the new CONNECT has clean session set, and that connection would outlive a revocation.
            log.info("ClientId %r connected again: closing its previous connection", session.client_id)
            await close_connection(previous[1])
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "attributes", "remote_address", "remote_port", "ssl_object"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        session.attributes[HANDLER] = handler
        return handler, session

    async def _admit(self, session: Session) -> int:
        """0 to admit, else the CONNACK return code. Runs before any session state changes."""
        if not await super()._authenticate(session, None):  # type: ignore[arg-type]
            return int(session.attributes.get("iotauth.connack", 5))
        meta = info(session)
        stored = self._sessions.get(session.client_id or "")
        if meta is not None and meta.kind == "bootstrap" and stored is not None:
            other = info(stored[0])
            # Connected or offline: a device's stored session holds its subscriptions and queued messages,
            # which a password-less CONNECT must neither take over nor wipe.
            if other is not None and other.kind == "device":
                log.warning("bootstrap CONNECT tried to take over the session of device %r", session.client_id)
                return 2
        return 0

    async def _authenticate(self, session: Session, _: Any) -> bool:
        return session.attributes.get(ADMITTED) is True

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        gate = getattr(self, "gate", None)
        if source_session is not None and gate is not None and topic_name is not None \
                and (topic_name + "/").startswith(gate.service.settings.prefix + "/"):
            log.warning("not retaining a device's publish on %r", topic_name)
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while a persistent session was offline are deliveries too: each passes RECEIVE."""
        handler = self._get_handler(session)
        tasks = []
        while handler is not None and not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if await self._topic_filtering(session, queued.topic, Action.RECEIVE):
                tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)))  # MQTT-3.3.1-9
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        subscribers = self._subscriptions.get(topic_filter, [])
        if handler is None or not any(s.client_id == session.client_id for s, _ in subscribers):
            return  # stock amqtt calls this at CONNECT for every stored filter, anyone's
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE):
                tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)


async def start_broker(service: AuthService, clock: Clock, host: str, port: int,
                       broker_cls: type[Broker] = HardenedBroker) -> tuple[HardenedBroker, Gate]:
    broker = broker_cls(broker_config(host, port))
    broker.connect_timeout = service.settings.connect_timeout
    broker.max_packet_size = service.settings.max_packet_size
    plugin = broker.plugins_manager.get_plugin("IotAuthPlugin")
    assert isinstance(plugin, IotAuthPlugin)
    gate = Gate(broker, service, clock)
    plugin.attach(gate)
    broker.gate = gate  # type: ignore[attr-defined]
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    amqtt_log.setLevel(logging.CRITICAL)  # a failed bind is reported below in one line, not as a traceback
    try:
        await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__
        reason = str(cause or exc).rsplit(": ", 1)[-1]  # asyncio's "error while attempting to bind ...: <why>"
        raise OSError(f"cannot listen for MQTT on {host}:{port}: {reason}") from None
    finally:
        amqtt_log.setLevel(level)
    gate.start()
    return broker, gate


def bound_port(broker: HardenedBroker) -> int:
    server = broker._servers["default"].instance
    return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
