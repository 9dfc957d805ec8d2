"""amqtt glue only: CONNECT decisions, topic decisions and request hand-off (protocol.md sections 6-7).

Every hook catches everything and fails closed (amqtt closes the socket on an
exception in `authenticate` and kills the client on one in `topic_filtering`),
and always returns a real bool: amqtt ignores None in authentication.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from authsvc import metrics
from authsvc.service import ConnectRefused
from broker.acl import bootstrap_acl, compile_acl, valid_identity

if TYPE_CHECKING:
    from broker.server import Gate

log = logging.getLogger("iotauth.broker")

ATTR = "iotauth"  # session.attributes namespace
# amqtt replaces an empty ClientId by "amqtt/<random>" before plugins run (MQTT-3.1.3-6 lets the server assign one)
GENERATED_ID_PREFIX = "amqtt/"


@dataclass
class SessionInfo:
    kind: str  # "device" | "bootstrap"
    acl: Any
    device: Any = None  # authsvc.service.ConnectedDevice for devices


def info(session: Session | None) -> SessionInfo | None:
    return session.attributes.get(ATTR) if session is not None else None


class IotAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        """No options: the running Gate is attached after the broker is built (see broker.server)."""

    gate: Gate | None = None

    def attach(self, gate: Gate) -> None:
        self.gate = gate

    async def authenticate(self, *, session: Session) -> bool:
        try:
            return self._authenticate(session)
        except ConnectRefused as exc:
            session.attributes["iotauth.connack"] = exc.code
            metrics.CONNECTS.labels(outcome="refused").inc()
            log.warning("CONNECT refused for %r from %s: %s", (session.client_id or "")[:80],
                        session.remote_address, exc)
        except Exception:
            log.exception("CONNECT check failed; refusing %r", (session.client_id or "")[:80])
        return False

    def _authenticate(self, session: Session) -> bool:
        gate = self.gate
        if gate is None:
            raise ConnectRefused("the authorization service is not attached")
        client_id = session.client_id or ""
        prefix = gate.service.settings.prefix
        if session.password is None:
            if not valid_identity(client_id) and not client_id.startswith(GENERATED_ID_PREFIX):
                raise ConnectRefused(f"ClientId {client_id[:80]!r} is not allowed", code=2)
            if session.will_flag:
                raise ConnectRefused("a bootstrap session may not set a Will")
            session.attributes[ATTR] = SessionInfo("bootstrap", bootstrap_acl(prefix))
            metrics.CONNECTS.labels(outcome="bootstrap").inc()
            return True
        if session.will_flag and session.will_qos not in (0, 1, 2):
            raise ConnectRefused(f"Will QoS {session.will_qos} is malformed (MQTT-3.1.2-14)")
        device = gate.service.authorize_connect(client_id, session.username, session.password, gate.clock.now(),
                                                source=session.remote_address or "")
        acl = compile_acl(device.scopes, gate.service.settings.scopes, client_id=device.client_id,
                          sub=device.sub, prefix=prefix)
        if session.will_flag and not acl.can_publish(session.will_topic or ""):
            raise ConnectRefused(f"Will topic {session.will_topic!r} is not allowed by the token's scopes")
        session.attributes[ATTR] = SessionInfo("device", acl, device)
        metrics.CONNECTS.labels(outcome="accepted").inc()
        log.info("CONNECT accepted for %s (scope %r)", device.client_id, " ".join(device.scopes))
        return True

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        try:
            allowed = self._topic_allowed(session, topic, action)
        except Exception:
            log.exception("ACL check failed; denying %s %r", action, topic)
            allowed = False
        if not allowed:
            metrics.ACL_DENIED.labels(action=str(action)).inc()
            client_id = session.client_id if session else None
            log.info("ACL denied %s %r for %r", action, topic, client_id)
            if self.gate is not None:
                self.gate.acl_denied(client_id, str(action), topic or "")
        return allowed

    def _topic_allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        meta = info(session)
        if meta is None or topic is None or self.gate is None:
            return False
        if meta.kind == "device" and self.gate.clock.now() >= meta.device.exp:
            self.gate.wake()  # backstop: the sweeper closes it
            return False
        if action == Action.PUBLISH:
            return bool(meta.acl.can_publish(topic))
        if action == Action.SUBSCRIBE:
            return bool(meta.acl.can_subscribe(topic))
        if action == Action.RECEIVE:
            return bool(meta.acl.can_receive(topic))
        return False

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        gate = self.gate
        if gate is None or not gate.api.is_request_topic(message.topic):
            return
        try:
            retain = bool(message.publish_packet and message.publish_packet.retain_flag)
            session = self.context.get_session(client_id)
            source = (session.remote_address if session is not None else None) or ""
            await gate.api.on_request(message.topic, bytes(message.data or b""), retain, source)
        except Exception:
            log.exception("request on %s failed", message.topic)

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        if self.gate is not None:
            self.gate.track(client_session)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        if self.gate is not None:
            self.gate.untrack(client_session)

    async def on_broker_post_start(self) -> None:
        if self.gate is not None:
            await self.gate.publish_jwks()
