"""The amqtt broker, hardened where a plugin alone cannot be (../shared/amqtt-notes.md, issue 3).

`HardenedBroker` overrides, each for a stated reason (reading packets off the socket is in `packets`):
- `_initialize_client_session`: wait at most `connect_timeout` for CONNECT, apply the per-source limits,
  and authenticate BEFORE any existing session is touched (stock amqtt wipes or takes over a victim's
  session first, flaw 1); a bootstrap CONNECT may not take over or wipe a device's session (CONNACK 2).
- `_authenticate`: returns the decision already taken above, so the plugin runs once per CONNECT
  (a second run would see its own proof as a replay).
- `_handle_message_delivery`: a client PUBLISH to a `$` topic is dropped and logged (stock amqtt leaves
  the session half-dead), and the broadcast carries the PUBLISH's QoS.
- `_run_broadcast`: delivery QoS is min(publish QoS, subscription QoS) (MQTT 3.1.1 section 3.8.4);
  stock amqtt delivers at the subscription's QoS (flaw 4). `$share/<group>/<filter>` delivers to one
  member in turn; stock amqtt matched it literally and never delivered.
- `add_subscription`: a repeated filter replaces the subscription's QoS (MQTT-3.8.4-3); stock amqtt kept
  the first.
- `retain_message`: a device's publish never becomes a retained message under the protocol prefix.
- `_publish_retained_messages_for_subscription`: retained messages obey the RECEIVE check and go only
  to the session's own subscriptions (flaw 2); `_publish_session_retained_messages` applies the same
  check to messages queued while a persistent session was offline.
- `stream_connected`: every socket reads through `PacketLimitReader` (no maximum in stock amqtt, flaw 3).
- `_handle_client_session`: frees the source's bootstrap slot when a bootstrap session ends.
- Bootstrap sessions are always clean, so nothing (a reply with a device code) waits for whoever
  reconnects with the same ClientId.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from authsvc import metrics
from authsvc.clock import Clock
from authsvc.quietlog import QuietLog
from authsvc.service import AuthService
from broker.acl import unshare
from broker.gate import HANDLER, Gate, close_connection
from broker.limits import ConnectLimiter
from broker.packets import KeepAliveHandler, PacketLimitReader, PacketTooLarge, read_timeout
from broker.plugin import IotAuthPlugin, info

log = logging.getLogger("iotauth.broker")

ADMITTED = "iotauth.admitted"
BOOTSTRAP_SOURCE = "iotauth.bootstrap_source"  # set while a bootstrap session holds one of its source's slots
SERVER_UNAVAILABLE = 3  # CONNACK for a source over its limits: "try later", not "your token is bad" (5)
QOS_2 = 2


class _RefusalEcho(logging.Filter):
    """amqtt logs a WARNING for every CONNECT we refuse ("Failed to initialize client session"); we log our
    own decision, once per source and window, so a flood of refused CONNECTs cannot fill the disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CONNECT refused with return code" not in record.getMessage()


logging.getLogger("amqtt.broker").addFilter(_RefusalEcho())


def _exact(topic_filter: str) -> bool:
    return "+" not in topic_filter and "#" not in topic_filter and unshare(topic_filter) == topic_filter


def broker_config(host: str, port: int) -> dict[str, Any]:
    # An explicit plugin list: the default one loads a packet logger that writes CONNECT passwords (tokens).
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"broker.plugin.IotAuthPlugin": {}},
    }


class HardenedBroker(Broker):
    connect_timeout: float = 10.0
    max_packet_size: int = 65536
    gate: Gate | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limiter = ConnectLimiter(attempts=20, window=10.0, bootstrap_sessions=50)  # start_broker sets it
        self._quiet = QuietLog()
        self._share_turn: dict[str, int] = {}  # shared subscription filter -> next member to deliver to
        self._filters_version = 0  # bumped when a new filter is stored
        self._pattern_version = -1
        self._patterns: list[tuple[str, str | None]] = []  # (stored filter, filter to match), no exact ones
        self.topic_plugin: IotAuthPlugin | None = None  # set by start_broker

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        limited = PacketLimitReader(StreamReaderAdapter(reader), self.max_packet_size)
        await self._client_connected(listener_name, limited, StreamWriterAdapter(writer))

    # -- CONNECT -------------------------------------------------------------------------------
    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await self._read_connect(reader, writer, remote_address, remote_port)
        try:
            code = await self._admit(session)
        except Exception:  # fail closed: refused and closed, never admitted, never a socket left without a session
            log.exception("CONNECT check failed; refusing %r from %s", (session.client_id or "")[:80], remote_address)
            code = 5
        if code:
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused with return code {code}")
        session.attributes[ADMITTED] = True
        bootstrap = info(session).kind == "bootstrap"  # type: ignore[union-attr]
        if bootstrap:
            session.clean_session = True  # nothing is kept for a password-less session: no queued replies
        session.keep_alive = read_timeout(session.keep_alive, bootstrap=bootstrap)
        session = await self._attach_session(session)
        session.attributes[HANDLER] = handler
        if bootstrap:
            self.limiter.bootstrap_opened(remote_address)
            session.attributes[BOOTSTRAP_SOURCE] = remote_address
        return handler, session

    async def _read_connect(self, reader: Any, writer: Any, remote_address: str,
                            remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            return await asyncio.wait_for(
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

    async def _admit(self, session: Session) -> int:
        """0 to admit, else the CONNACK return code. Runs before any session state changes."""
        source = session.remote_address or ""
        code = self._over_limits(session, source)
        if code:
            return code
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
        if meta is not None and meta.kind == "device":
            self.limiter.refund(source)  # a device's own (re)connects never count against its address
        return 0

    def _over_limits(self, session: Session, source: str) -> int:
        """CONNACK 3 when the source is over its CONNECT or bootstrap limit. A CONNECT carrying a live
        token we issued to that ClientId passes (then is fully verified), so devices are unaffected; a
        few times per token and window, so a leaked token without its key buys no flood."""
        limiter = self.limiter
        bootstrap = session.password is None
        if not limiter.attempt(source) and (bootstrap or not limiter.token_pass(self._live_token_jti(session))):
            reason = f"more than {limiter.attempts} CONNECT attempts within {limiter.window:g} s"
        elif bootstrap and not limiter.bootstrap_allowed(source):
            reason = f"{limiter.bootstrap_sessions} bootstrap sessions already open"
        else:
            return 0
        metrics.CONNECTS.labels(outcome="limited").inc()
        left_out = self._quiet.due(source)  # one line per source and window: a flood cannot fill the disk
        if left_out is not None:
            log.warning("CONNECT from %s refused with CONNACK 3: %s (%d more refused since the last such line)",
                        source, reason, left_out)
        return SERVER_UNAVAILABLE

    def _live_token_jti(self, session: Session) -> str | None:
        if self.gate is None or not isinstance(session.password, str):
            return None
        return self.gate.service.live_token_jti(session.client_id or "", session.password, self.gate.clock.now())

    async def _attach_session(self, session: Session) -> Session:
        """MQTT 3.1.4: a new connection takes over its ClientId's session (or starts clean)."""
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
            # clean_session too: this connection's flag decides what happens at its end (stock amqtt kept
            # the old one, so a session that began clean lost its subscriptions on every later disconnect)
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "attributes", "remote_address", "remote_port", "ssl_object",
                         "clean_session"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        return session

    async def _authenticate(self, session: Session, _: Any) -> bool:
        return session.attributes.get(ADMITTED) is True

    async def _handle_client_session(self, reader: Any, writer: Any, session: Session, *args: Any) -> None:
        try:
            await super()._handle_client_session(reader, writer, session, *args)
        finally:
            source = session.attributes.pop(BOOTSTRAP_SOURCE, None)
            if source is not None:
                self.limiter.bootstrap_closed(source)

    # -- PUBLISH and delivery ------------------------------------------------------------------------
    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        """Stock amqtt's checks, plus: `$` topics dropped cleanly, and the PUBLISH's QoS kept for delivery."""
        message = wait_deliver.result()
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id,
                                              message=message)
        if message is None:
            return True
        topic = message.topic
        if not isinstance(topic, str) or not topic or "#" in topic or "+" in topic:
            log.warning("closing %r: PUBLISH to an invalid topic name (MQTT-3.3.2-2)", client_session.client_id)
            return False
        if topic.startswith("$"):
            log.warning("dropped a PUBLISH from %r to %r: clients never publish to $ topics",
                        client_session.client_id, topic[:120])
            metrics.ACL_DENIED.labels(action="publish").inc()
            return True
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            return True  # the plugin logged it
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id,
                                              message=message)
        await self._broadcast_message(client_session, topic, message.data, message.qos)
        if message.publish_packet and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """Delivers one broadcast at min(publish QoS, subscription QoS). A broadcast's "qos" is the QoS it
        was published with (stock amqtt read it as a QoS to force on every subscriber)."""
        broadcast = await self._broadcast_queue.get()
        topic, data = broadcast["topic"], broadcast["data"]
        published_qos = broadcast.get("qos", QOS_2)
        for topic_filter, inner in self._filters_matching(topic):
            subscriptions = self._subscriptions.get(topic_filter)
            if not subscriptions:
                continue
            if inner != topic_filter:
                subscriptions = self._share_in_turn(topic_filter, subscriptions)
            for target, granted_qos in subscriptions:
                qos = min(published_qos, granted_qos)
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    # MQTT 3.1.2.4: a persistent session keeps QoS 1 and 2 messages while offline
                    if not target.clean_session and qos > 0 and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler:
                    running_tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False)))
                    if inner != topic_filter:
                        break  # a shared subscription delivers each message to one member of the group

    def _filters_matching(self, topic: str) -> list[tuple[str, str]]:
        """(stored filter, filter to match) pairs for the topic. An exact filter is one dict lookup; only
        wildcard and `$share` filters are matched one by one (stock amqtt matched every filter, which cost
        0.5 ms per message with 2,000 devices each subscribed to their own topics)."""
        if self._pattern_version != self._filters_version:
            self._patterns = [(f, unshare(f)) for f in self._subscriptions if not _exact(f)]
            self._pattern_version = self._filters_version
        found = [(topic, topic)] if topic in self._subscriptions else []
        found += [(f, inner) for f, inner in self._patterns if inner is not None and self._matches(topic, inner)]
        return found

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter = subscription[0]
        if topic_filter not in self._subscriptions:
            self._filters_version += 1  # a new filter: `_filters_matching` rebuilds its list of patterns
        granted = await super().add_subscription(subscription, session)
        if granted != 0x80:
            # MQTT-3.8.4-3: a repeated filter replaces the subscription; stock amqtt kept the first QoS
            members = self._subscriptions.get(topic_filter, [])
            members[:] = [(s, granted if s.client_id == session.client_id else q) for s, q in members]
        return granted

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Our plugin is the only topic checker and always answers a real bool, catching its own errors: ask it
        directly. amqtt's plugin manager gathers every plugin's answer in tasks, ~120 us per check."""
        if self.topic_plugin is None:
            return await super()._topic_filtering(session, topic, action)
        return await self.topic_plugin.topic_filtering(session=session, topic=topic, action=action)

    def _share_in_turn(self, topic_filter: str, members: list[tuple[Session, int]]) -> list[tuple[Session, int]]:
        """`$share/<group>/<filter>` (stock amqtt matched it literally, so it never delivered): the group's
        connected members take turns; a message goes offline only when no member is connected."""
        if len(self._share_turn) > 10_000:
            self._share_turn.clear()  # filters come and go; only fairness is lost, never a message
        start = self._share_turn.get(topic_filter, 0) % max(len(members), 1)
        self._share_turn[topic_filter] = start + 1
        in_turn = members[start:] + members[:start]
        connected = [m for m in in_turn if m[0].transitions.state == "connected"]
        return connected or in_turn[:1]

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
    settings = service.settings
    broker.max_packet_size = settings.max_packet_size
    broker.limiter = ConnectLimiter(settings.connect_attempts_per_source, settings.connect_attempt_window,  # type: ignore[attr-defined]
                                    settings.bootstrap_sessions_per_source)
    plugin = broker.plugins_manager.get_plugin("IotAuthPlugin")
    assert isinstance(plugin, IotAuthPlugin)
    gate = Gate(broker, service, clock)
    plugin.attach(gate)
    if isinstance(broker, HardenedBroker):
        broker.topic_plugin = plugin
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
