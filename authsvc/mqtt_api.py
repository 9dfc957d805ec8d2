"""The MQTT adapter of the service: request topics in, one reply out (protocol.md section 3).

This is the one place where OAuth errors become MQTT replies. Requests that
cannot be answered are dropped, logged with their reason and counted.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from authsvc import metrics
from authsvc.clock import Clock
from authsvc.errors import InvalidRequest, OAuthError, ServerError, TemporarilyUnavailable
from authsvc.quietlog import QuietLog
from authsvc.service import ENDPOINTS, AuthService

log = logging.getLogger("iotauth.mqtt_api")

REPLY_ID = re.compile(r"[A-Za-z0-9_-]{22,64}", re.ASCII)
MAX_CORRELATION_ID = 64
SURROGATE = re.compile(r"[\ud800-\udfff]")

Publish = Callable[[str, bytes], Awaitable[None]]


class Dropped(Exception):
    """A request with no usable reply_to: nothing can be answered."""


def not_json(constant: str) -> Any:
    """json.loads reads NaN, Infinity and -Infinity; RFC 8259 has none of them, and echoing one back
    (in correlation_id) would make the reply itself not JSON."""
    raise ValueError(f"{constant} is not JSON")


def lone_surrogate(value: Any) -> bool:
    """Whether a string of the parsed body (keys included) holds a lone surrogate. JSON's \\u escapes can
    name one (json.loads joins only valid pairs), but no UTF-8 text carries it: the core could not encode
    it, e.g. to hash a token. Iterative, so a deeply nested body cannot exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class MqttApi:
    def __init__(self, service: AuthService, clock: Clock, publish: Publish) -> None:
        self.service = service
        self.clock = clock
        self.publish = publish
        prefix = service.settings.prefix
        self.request_topics = {f"{prefix}/{e}": e for e in ENDPOINTS}
        self.reply_prefix = f"{prefix}/reply/"
        self._quiet = QuietLog()  # one line per endpoint and error code per window: a flood cannot fill the disk

    def is_request_topic(self, topic: str) -> bool:
        return topic in self.request_topics

    def parse_envelope(self, payload: bytes, retain: bool) -> tuple[str, dict[str, Any]]:
        if retain:
            raise Dropped("published with the retain flag")
        if len(payload) > self.service.settings.max_request_size:
            raise Dropped(f"{len(payload)} bytes exceeds the {self.service.settings.max_request_size} byte limit")
        try:
            body = json.loads(payload.decode("utf-8"), parse_constant=not_json)
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
            raise Dropped("payload is not UTF-8 JSON") from None
        if not isinstance(body, dict):
            raise Dropped("payload is not a JSON object")
        reply_to = body.get("reply_to")
        if not isinstance(reply_to, str) or not reply_to.startswith(self.reply_prefix) \
                or not REPLY_ID.fullmatch(reply_to[len(self.reply_prefix):]):
            raise Dropped("missing or malformed reply_to")
        return reply_to, body

    async def on_request(self, topic: str, payload: bytes, retain: bool = False, source: str = "") -> None:
        endpoint = self.request_topics[topic]
        try:
            reply_to, body = self.parse_envelope(payload, retain)
        except Dropped as exc:
            metrics.REQUESTS_DROPPED.labels(endpoint=endpoint).inc()
            log.warning("dropped request on %s: %s", topic, exc)
            return
        response = self.answer(endpoint, body, source)
        await self.publish(reply_to, json.dumps(response, separators=(",", ":")).encode())

    def answer(self, endpoint: str, body: dict[str, Any], source: str = "") -> dict[str, Any]:
        now = self.clock.now()
        correlation = body.get("correlation_id")
        try:
            if lone_surrogate(body):
                raise InvalidRequest("Strings must be Unicode text: a \\u escape names a lone surrogate")
            if "correlation_id" in body and (not isinstance(correlation, str) or len(correlation) > MAX_CORRELATION_ID):
                raise InvalidRequest(f"correlation_id must be a string of at most {MAX_CORRELATION_ID} characters")
            response = self.service.handle(endpoint, body, now, source)
            metrics.REQUESTS.labels(endpoint=endpoint, outcome="ok").inc()
        except OAuthError as exc:
            response = self.render_error(endpoint, exc)
        except sqlite3.OperationalError as exc:
            log.error("database busy on %s: %s", endpoint, exc)
            response = self.render_error(endpoint, TemporarilyUnavailable())
        except Exception:
            log.exception("internal error on %s", endpoint)
            response = self.render_error(endpoint, ServerError())
        if "correlation_id" in body:  # echoed whenever the request had one, even a malformed one (section 3)
            response["correlation_id"] = correlation
        response["dpop_nonce"] = self.service.current_nonce(now)
        return response

    def render_error(self, endpoint: str, exc: OAuthError) -> dict[str, Any]:
        metrics.REQUESTS.labels(endpoint=endpoint, outcome=exc.error).inc()
        level = logging.INFO if exc.error in ("authorization_pending", "slow_down") else logging.WARNING
        left_out = self._quiet.due((endpoint, exc.error))
        if left_out is not None:
            more = f" ({left_out} more like it in the last {self._quiet.window:g} s)" if left_out else ""
            log.log(level, "%s -> %s: %s%s", endpoint, exc.error, exc.detail, more)
        return exc.to_wire()
