"""Request/response over MQTT (protocol section 3), as a device sends them.

A request is one JSON PUBLISH (QoS 1, not retained) to ``<prefix>/<endpoint>``
carrying ``reply_to`` (the device's own ``<prefix>/reply/<reply-id>``) and a
``correlation_id``; the answer arrives on the reply topic with the same
``correlation_id`` and the current ``dpop_nonce``.

Like aiomqtt's ``_pending_call``, every call registers one pending slot per
correlation id and removes it in ``finally``, whatever happens: response,
timeout, a failing publish, or :meth:`Requester.fail_all` (session lost, stop).
Responses arrive on paho's network thread and are handed over with a
``threading.Event`` per slot.

On ``use_dpop_nonce`` (RFC 9449 section 8) the call is repeated once with a new
proof, which then carries the nonce the error response delivered.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from device_sim.errors import RequestTimeout, ServiceBusy, ServiceError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "oauth/v1"
DEVICE_AUTHORIZATION = "device_authorization"
TOKEN = "token"
REVOKE = "revoke"
USE_DPOP_NONCE = "use_dpop_nonce"
MAX_REQUEST_BYTES = 16 * 1024
REPLY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22,64}")

Publish = Callable[[str, bytes], None]
ProofFactory = Callable[[str], str]
"""Given the request topic (the proof's ``htu``), a fresh proof: new ``jti``, current nonce."""


def new_reply_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/reply/<reply-id>`` with 192 random bits (32 base64url characters)."""
    return f"{prefix}/reply/{secrets.token_urlsafe(24)}"


def new_correlation_id() -> str:
    return secrets.token_urlsafe(12)


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None
    error: Exception | None = None


class Requester:
    """Sends requests through ``publish`` and matches responses fed to :meth:`deliver`.

    ``on_nonce`` is called (in the caller's thread) with the ``dpop_nonce`` of
    every response, so the device can remember it for its next proof, CONNECT
    included.
    """

    def __init__(
        self,
        publish: Publish,
        reply_topic: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 10.0,
        on_nonce: Callable[[str], None] | None = None,
    ) -> None:
        reply_id = reply_topic.removeprefix(f"{prefix}/reply/")
        if reply_id == reply_topic or not REPLY_ID_PATTERN.fullmatch(reply_id):
            raise ValueError(f"reply topic must be {prefix}/reply/<22-64 of [A-Za-z0-9_-]>")
        self.reply_topic = reply_topic
        self.prefix = prefix
        self.timeout = timeout
        self._publish = publish
        self._on_nonce = on_nonce
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def topic(self, endpoint: str) -> str:
        return f"{self.prefix}/{endpoint}"

    def deliver(self, payload: bytes) -> None:
        """Hand a message from the reply topic to its waiting call (any thread)."""
        try:
            response = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: dropped a reply that is not JSON", self.reply_topic)
            return
        if not isinstance(response, dict):
            log.warning("%s: dropped a reply that is not a JSON object", self.reply_topic)
            return
        correlation_id = response.get("correlation_id")
        with self._lock:
            slot = self._pending.get(correlation_id) if isinstance(correlation_id, str) else None
        if slot is None:
            log.info("%s: dropped a reply nobody waits for", self.reply_topic)
            return
        slot.response = response
        slot.done.set()

    def fail_all(self, error: Exception) -> None:
        """Wake every waiting call with ``error`` (the session is gone, or the device stops)."""
        with self._lock:
            slots = list(self._pending.values())
        for slot in slots:
            slot.error = error
            slot.done.set()

    def call(self, endpoint: str, params: Mapping[str, str], *, proof: ProofFactory | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """One request and its raw response (success or error object); remembers the nonce."""
        correlation_id = new_correlation_id()
        topic = self.topic(endpoint)
        message: dict[str, str] = {**params, "reply_to": self.reply_topic, "correlation_id": correlation_id}
        if proof is not None:
            message["dpop"] = proof(topic)
        payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        if len(payload) > MAX_REQUEST_BYTES:
            raise ValueError(f"request to {topic} is {len(payload)} bytes, over {MAX_REQUEST_BYTES}")
        slot = _Pending()
        with self._lock:
            self._pending[correlation_id] = slot
        try:
            self._publish(topic, payload)
            wait = self.timeout if timeout is None else timeout
            if not slot.done.wait(wait):
                raise RequestTimeout(f"no response to {topic} within {wait:g} s")
        finally:
            with self._lock:
                self._pending.pop(correlation_id, None)
        if slot.error is not None:
            raise slot.error
        response = slot.response
        assert response is not None
        nonce = response.get("dpop_nonce")
        if isinstance(nonce, str) and nonce and self._on_nonce is not None:
            self._on_nonce(nonce)
        return response

    def request(self, endpoint: str, params: Mapping[str, str], *, proof: ProofFactory | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """:meth:`call`, retried once on ``use_dpop_nonce``; an error response raises ServiceError."""
        response = self.call(endpoint, params, proof=proof, timeout=timeout)
        if response.get("error") == USE_DPOP_NONCE and proof is not None:
            response = self.call(endpoint, params, proof=proof, timeout=timeout)
        if "error" in response:
            raise (ServiceBusy if response.get("error") in ServiceBusy.ERRORS else ServiceError)(response)
        return response
