"""The Gate between the running broker and the authorization service (protocol.md sections 3, 6, 7).

Requests published on the protocol topics go to `MqttApi`; replies and the retained JWKS go out
through the broker; sessions are closed at token expiry and, within a second, on revocation by any
process (the revocation feed lives in the database). A signing-key rotation by any process is picked
up by the same sweep, and the retained JWKS re-published.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqtt.session import Session

from authsvc import metrics
from authsvc.clock import Clock
from authsvc.mqtt_api import MqttApi
from authsvc.service import AuthService
from broker.plugin import info

if TYPE_CHECKING:
    from broker.server import HardenedBroker

log = logging.getLogger("iotauth.broker")

SWEEP_SECONDS = 0.2
HANDLER = "iotauth.handler"  # the connection's protocol handler, so the Gate can close exactly that connection


async def close_connection(handler: Any) -> None:
    """Close one client connection for sure.

    `handle_connection_closed()` alone is not enough on Python 3.11: amqtt's reader waits inside
    `asyncio.wait_for`, which can swallow the cancellation when a packet arrives at that moment
    (CPython gh-86296), leaving a revoked session connected. Aborting the transport ends the reader
    with a connection error whatever it was doing."""
    await handler.handle_connection_closed()
    transport = getattr(getattr(getattr(handler, "writer", None), "_writer", None), "transport", None)
    if transport is not None:
        transport.abort()


class Gate:
    """What the running broker needs from the service, and what the service needs from the broker."""

    def __init__(self, broker: HardenedBroker, service: AuthService, clock: Clock) -> None:
        self.broker = broker
        self.service = service
        self.clock = clock
        self.api = MqttApi(service, clock, self.publish)
        self._devices: dict[int, Session] = {}
        self._wake = asyncio.Event()
        self._last_revocation = service.store.last_revocation_id()
        self._jwks_version: int | None = None  # the key set last published on P/jwks
        self._task: asyncio.Task[None] | None = None
        self.on_acl_denied: list[Callable[[str | None, str, str], None]] = []  # (client_id, action, topic)
        service.on_revocation.append(self.wake)

    def acl_denied(self, client_id: str | None, action: str, topic: str) -> None:
        for observer in self.on_acl_denied:
            observer(client_id, action, topic)

    async def publish(self, topic: str, data: bytes) -> None:
        await self.broker.internal_message_broadcast(topic, data, 1)

    async def publish_jwks(self) -> None:
        """Retained for later subscribers, and sent to the current ones (amqtt's retain_message only stores)."""
        keys = self.service.keys
        keys.refresh(self.clock.now())
        self._jwks_version = keys.version
        topic = f"{self.service.settings.prefix}/jwks"
        data = json.dumps(keys.jwks(), separators=(",", ":")).encode()
        await self.broker.retain_message(None, topic, data, 1)
        await self.publish(topic, data)

    async def follow_keys(self) -> None:
        """Pick up `iotauth keys rotate` (another process) and let retired keys age out: new tokens are signed
        with the new key at once, CONNECT verifies with the new set, and the retained JWKS follows."""
        keys = self.service.keys
        keys.refresh(self.clock.now())
        if keys.version != self._jwks_version:
            log.info("signing keys changed: publishing %d key(s) on %s/jwks", len(keys.jwks()["keys"]),
                     self.service.settings.prefix)
            await self.publish_jwks()

    def track(self, session: Session) -> None:
        meta = info(session)
        if meta is not None and meta.kind == "device":
            self._devices[id(session)] = session
        metrics.SESSIONS.labels(kind=meta.kind if meta else "unknown").inc()

    def untrack(self, session: Session) -> None:
        self._devices.pop(id(session), None)
        meta = info(session)
        metrics.SESSIONS.labels(kind=meta.kind if meta else "unknown").dec()

    def wake(self) -> None:
        """Sweep now rather than at the next tick (a token was seen expired, or a grant revoked)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SWEEP_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("session sweep failed")
            try:
                await self.follow_keys()
            except Exception:
                log.exception("following the signing keys failed")

    async def sweep(self) -> None:
        """Close sessions whose token expired or whose grant or token was revoked (by any process)."""
        now = self.clock.now()
        events = self.service.store.revocations_after(self._last_revocation)
        if events:
            self._last_revocation = events[-1].id
        grants = {e.grant_id for e in events if e.jti is None}
        jtis = {e.jti for e in events if e.jti is not None}
        for session in list(self._devices.values()):
            device = info(session).device  # type: ignore[union-attr]
            if device.exp <= now:
                await self.disconnect(session, "expired")
            elif device.grant_id in grants or device.jti in jtis:
                await self.disconnect(session, "revoked")

    async def disconnect(self, session: Session, reason: str) -> None:
        self._devices.pop(id(session), None)
        handler = session.attributes.get(HANDLER)
        if handler is None:
            return
        session.will_flag = False  # no Will when the server closes the session (protocol section 7)
        log.warning("closing session of %s: token %s", session.client_id, reason)
        metrics.DISCONNECTS.labels(reason=reason).inc()
        await close_connection(handler)
