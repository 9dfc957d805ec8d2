"""Reading packets off a client's socket, where stock amqtt 0.12.1 is too trusting (../shared/amqtt-notes.md).

- `PacketLimitReader`: a packet over the maximum size closes its connection before its body is buffered
  (stock amqtt has no maximum, flaw 3).
- `_StrictPacket` (installed into amqtt's reader): a packet that does not decode closes the connection;
  stock amqtt skipped it and parsed the rest of it as further packets.
- `KeepAliveHandler`: a session silent for 1.5 x its keep-alive is closed (stock amqtt only logs it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.adapters import ReaderAdapter
from amqtt.errors import MQTTError
from amqtt.mqtt.protocol import handler as _amqtt_handler
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from broker.gate import close_connection

log = logging.getLogger("iotauth.broker")

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
