"""A simulated ESP32 that pairs and works like an honest client of protocol v1.

The flow, with the RFC sections it follows:

1. RFC 8628 section 3.1-3.2: ``device_authorization`` with a DPoP proof (so the
   device code is bound to the device key), then show the user code, the
   verification URI and a QR code of ``verification_uri_complete``.
2. RFC 8628 section 3.4-3.5: poll ``token`` every ``interval`` seconds, 5 s more
   after each ``slow_down``; stop on ``access_denied`` or ``expired_token``.
3. RFC 9449: every request carries a fresh proof with the last server nonce;
   ``use_dpop_nonce`` is retried once (see :mod:`device_sim.requests`).
4. Protocol section 6: CONNECT with ClientId = username = client_id and
   password = access token + " " + CONNECT proof (``ath``, ``htu`` = audience).
5. RFC 6749 section 6: refresh about 60 s before expiry (at 80 % for short
   lifetimes), store the rotated refresh token first, then reconnect with the
   new access token. A lost session triggers a refresh; ``invalid_grant``
   clears the refresh token and the device pairs again.

The role follows the granted scopes (:mod:`device_sim.roles`). Observers get
:class:`~device_sim.events.DeviceEvent` objects through ``on_event`` (names and
data in :mod:`device_sim.events`); time comes from the injected ``now`` callable.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from joserfc.jwk import ECKey

from device_sim import events as ev
from device_sim.errors import (
    ConnectRefused,
    DeviceSimError,
    DeviceStopped,
    PairingError,
    RequestTimeout,
    ServiceBusy,
    ServiceError,
    StateError,
)
from device_sim.events import DeviceEvent
from device_sim.flow import (
    DEVICE_CODE_GRANT,
    POLL_AGAIN,
    REFRESH_GRANT,
    TokenSet,
    backoff_delay,
    next_poll_interval,
    pairing_message,
    parse_device_authorization,
    parse_token_response,
)
from device_sim.proofs import (
    connect_proof,
    generate_key,
    import_private_key,
    jwk_thumbprint,
    private_jwk,
    public_jwk,
    publish_proof,
)
from device_sim.requests import (
    DEFAULT_PREFIX,
    DEVICE_AUTHORIZATION,
    REVOKE,
    TOKEN,
    Requester,
    new_reply_topic,
)
from device_sim.roles import (
    ALL_TEMPERATURES,
    DEVICE_POWER,
    READ_TEMPERATURE,
    WRITE_TEMPERATURE,
    Thermometer,
    check_client_id,
    decode_payload,
    parse_power_command,
    power_set_topic,
    power_state_topic,
    temperature_topic,
)
from device_sim.sealed_state import DeviceState, MemoryStore, StateStore
from device_sim.session import SUBACK_FAILURE, Session, bootstrap_client_id

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "mqtt://localhost:1883"
REFRESH_RETRY = 10.0  # seconds between refresh attempts after a timeout
MAX_WAIT_SLICE = 1.0  # the serve loop looks at the (possibly injected) clock at least this often

_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3
_TRANSIENT = (RequestTimeout, TimeoutError, OSError, ServiceBusy)
SERVER_UNAVAILABLE = 3  # CONNACK: over the broker's per-address CONNECT limits (protocol section 6)


# -- the device -----------------------------------------------------------------

class Device:
    """One simulated device. Use :meth:`run` (blocking) or :meth:`start` (thread) and :meth:`stop`.

    The steps are public too (:meth:`pair`, :meth:`refresh`, :meth:`connect`,
    :meth:`publish_reading`, :meth:`set_power`, :meth:`send_power_command`,
    :meth:`revoke`, :meth:`disconnect`) for tests that drive the flow one step at a time.
    """

    def __init__(
        self,
        client_id: str,
        scope: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        audience: str = DEFAULT_AUDIENCE,
        topic_prefix: str = DEFAULT_PREFIX,
        interval: float = 5.0,
        store: StateStore | None = None,
        now: Callable[[], float] = time.time,
        on_event: Callable[[DeviceEvent], None] | None = None,
        request_timeout: float = 10.0,
        keepalive: int = 30,
        thermometer: Thermometer | None = None,
    ) -> None:
        check_client_id(client_id)
        if not scope.split() or not all(_SCOPE_TOKEN.fullmatch(s) for s in scope.split()):
            raise ValueError(f"scope {scope!r}: one or more space-separated scope tokens")
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.client_id = client_id
        self.scope = " ".join(scope.split())
        self.host = host
        self.port = port
        self.audience = audience
        self.topic_prefix = topic_prefix
        self.interval = interval
        self.request_timeout = request_timeout
        self.keepalive = keepalive
        self.now = now
        self.store: StateStore = store if store is not None else MemoryStore()
        self.error: BaseException | None = None
        self._on_event = on_event
        self._thermometer = thermometer or Thermometer()
        self._state: DeviceState | None = None
        self._key: ECKey | None = None
        self._tokens: TokenSet | None = None
        self._power = "off"
        self._auth: Session | None = None
        self._auth_requester: Requester | None = None
        self._auth_channel_ok = True  # False after a request on it timed out: use bootstrap instead
        self._boot: Session | None = None
        self._boot_requester: Requester | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._runner: threading.Thread | None = None
        self._in_callback = threading.local()

    # -- observation ------------------------------------------------------------
    @property
    def thumbprint(self) -> str:
        """RFC 7638 thumbprint of the device key: the ``cnf.jkt`` of its tokens."""
        self.load()
        return jwk_thumbprint(self.public_jwk)

    @property
    def public_jwk(self) -> dict[str, str]:
        self.load()
        assert self._key is not None
        return public_jwk(self._key)

    @property
    def tokens(self) -> TokenSet | None:
        """The current tokens (secrets: for tests, never for logs)."""
        return self._tokens

    @property
    def access_token(self) -> str | None:
        return self._tokens.access_token if self._tokens else None

    @property
    def refresh_token(self) -> str | None:
        return self._state.refresh_token if self._state else None

    @property
    def dpop_nonce(self) -> str | None:
        return self._state.dpop_nonce if self._state else None

    @property
    def granted_scopes(self) -> set[str]:
        return set((self._tokens.scope if self._tokens else self.scope).split())

    @property
    def power(self) -> str:
        return self._power

    @property
    def connected(self) -> bool:
        session = self._auth
        return session is not None and session.connected

    def _emit(self, name: str, **data: Any) -> None:
        log.debug("%s: %s %s", self.client_id, name, data)
        if self._on_event is None:
            return
        self._in_callback.active = True
        try:
            self._on_event(DeviceEvent(name, data))
        except Exception:
            log.exception("on_event callback failed for %s", name)
        finally:
            self._in_callback.active = False

    # -- state ------------------------------------------------------------------
    def load(self) -> None:
        """Load the sealed state, or create the key and save it. Idempotent."""
        with self._lock:
            if self._state is not None:
                return
            state = self.store.load()
            created = state is None
            if state is None:
                state = DeviceState(client_id=self.client_id, private_jwk=private_jwk(generate_key()))
            elif state.client_id != self.client_id:
                raise StateError(f"state holds device {state.client_id!r}, not {self.client_id!r}")
            dropped = state.refresh_token is not None and state.scope != self.scope
            if dropped:
                state.refresh_token = None
            try:
                self._key = import_private_key(state.private_jwk)
            except ValueError as exc:
                raise StateError(f"state for {self.client_id}: unusable key ({exc})") from None
            self._state = state
            if created or dropped:
                self._save()
        self._emit(ev.KEY_READY, jkt=jwk_thumbprint(public_jwk(self._key)), created=created)
        if dropped:
            self._emit(ev.GRANT_LOST, error="scope_changed",
                       description=f"paired for {state.scope!r}, asked for {self.scope!r}: pairing again")

    def _save(self) -> None:
        assert self._state is not None
        self.store.save(self._state)

    def _remember_nonce(self, nonce: str) -> None:
        with self._lock:
            assert self._state is not None
            if nonce != self._state.dpop_nonce:
                self._state.dpop_nonce = nonce
                self._save()

    def _request_proof(self, topic: str) -> str:
        assert self._key is not None and self._state is not None
        return publish_proof(self._key, topic, now=self.now(), nonce=self._state.dpop_nonce)

    # -- request channels -------------------------------------------------------
    def _requester(self) -> Requester:
        """The authenticated session's channel when connected, else the bootstrap one."""
        with self._lock:
            if self._auth is not None and self._auth.connected and self._auth_channel_ok:
                try:
                    if self._auth_requester is None:
                        self._auth_requester = self._attach_requester(self._auth)
                    return self._auth_requester
                except DeviceSimError as exc:  # the protocol allows it; fall back if a broker does not
                    log.warning("%s: %s; using a bootstrap session", self.client_id, exc)
            if self._boot is None or not self._boot.connected:
                self._close_bootstrap()
                session = Session(bootstrap_client_id(self.client_id), self.host, self.port,
                                  keepalive=self.keepalive)
                session.open(self.request_timeout)
                try:
                    requester = self._attach_requester(session)
                except BaseException:
                    session.close()
                    raise
                self._boot, self._boot_requester = session, requester
            assert self._boot_requester is not None
            return self._boot_requester

    def _attach_requester(self, session: Session) -> Requester:
        requester = Requester(
            lambda topic, payload: session.publish(topic, payload, qos=1),
            new_reply_topic(self.topic_prefix),
            prefix=self.topic_prefix,
            timeout=self.request_timeout,
            on_nonce=self._remember_nonce,
        )
        session.when_lost(lambda gone: requester.fail_all(ConnectionError(f"lost: {gone.lost_reason}")))
        granted = session.subscribe(requester.reply_topic, lambda _topic, payload: requester.deliver(payload),
                                    timeout=self.request_timeout)
        if granted == SUBACK_FAILURE:
            raise DeviceSimError(f"broker refused the subscription to {requester.reply_topic}")
        return requester

    def _close_bootstrap(self) -> None:
        with self._lock:
            session, self._boot, self._boot_requester = self._boot, None, None
        if session is not None:
            session.close()

    # -- flow steps -------------------------------------------------------------
    def pair(self) -> TokenSet:
        """RFC 8628 device flow: show the code, poll until approved. Raises PairingError."""
        self.load()
        try:
            response = self._requester().request(
                DEVICE_AUTHORIZATION, {"client_id": self.client_id, "scope": self.scope},
                proof=self._request_proof)
        except ServiceBusy:
            raise  # transient: the caller retries after a pause
        except ServiceError as exc:
            raise PairingError(exc.error, f"device authorization refused: {exc}") from None
        code = parse_device_authorization(response)
        self._emit(ev.CODE_SHOWN, user_code=code.user_code, verification_uri=code.verification_uri,
                   verification_uri_complete=code.verification_uri_complete,
                   expires_in=code.expires_in, interval=code.interval)
        deadline = self.now() + code.expires_in
        interval = float(code.interval)
        params = {"grant_type": DEVICE_CODE_GRANT, "device_code": code.device_code,
                  "client_id": self.client_id}
        while True:
            self._pause(interval)
            if self.now() > deadline:
                raise PairingError("expired_token", pairing_message("expired_token"))
            try:
                response = self._requester().request(TOKEN, params, proof=self._request_proof)
            except _TRANSIENT as exc:
                self._emit(ev.ERROR, message=f"poll failed: {exc}", retry_in=interval)
                continue
            except ServiceError as exc:
                if exc.error not in POLL_AGAIN:
                    raise PairingError(exc.error, pairing_message(exc.error, exc.description)) from None
                interval = next_poll_interval(interval, exc.error)
                self._emit(ev.POLLED, error=exc.error, interval=interval)
                continue
            return self._accept_tokens(response, DEVICE_CODE_GRANT)

    def refresh(self) -> TokenSet:
        """RFC 6749 section 6 with the stored refresh token.

        On ``invalid_grant`` the refresh token is forgotten (``grant_lost``) and
        the ServiceError is raised: the next :meth:`run` round pairs again.
        """
        self.load()
        assert self._state is not None
        refresh_token = self._state.refresh_token
        if refresh_token is None:
            raise DeviceSimError(f"{self.client_id} holds no refresh token; pair first")
        params = {"grant_type": REFRESH_GRANT, "refresh_token": refresh_token, "client_id": self.client_id}
        try:
            response = self._requester().request(TOKEN, params, proof=self._request_proof)
        except ServiceError as exc:
            if exc.error == "invalid_grant":
                self._forget_grant()
                self._emit(ev.GRANT_LOST, error=exc.error, description=exc.description)
            raise
        return self._accept_tokens(response, REFRESH_GRANT)

    def _accept_tokens(self, response: Mapping[str, Any], grant_type: str) -> TokenSet:
        tokens = parse_token_response(response, self.scope, self.now())
        with self._lock:
            assert self._state is not None
            self._state.refresh_token = tokens.refresh_token
            self._state.scope = self.scope
            self._save()  # the rotated refresh token is on disk before the access token is used
            self._tokens = tokens
        self._emit(ev.TOKENS_RECEIVED, grant_type=grant_type, scope=tokens.scope,
                   expires_in=tokens.expires_in)
        return tokens

    def _forget_grant(self) -> None:
        with self._lock:
            assert self._state is not None
            self._state.refresh_token = None
            self._tokens = None
            self._save()

    def revoke(self) -> None:
        """RFC 7009: revoke the stored refresh token (and with it the grant), then forget it."""
        self.load()
        assert self._state is not None
        token = self._state.refresh_token
        if token is None:
            return
        self._requester().request(
            REVOKE, {"token": token, "token_type_hint": "refresh_token", "client_id": self.client_id},
            proof=self._request_proof)
        self._forget_grant()

    def connect(self) -> None:
        """CONNECT with access token + proof, then subscribe and publish as the scopes allow.

        Raises ConnectRefused (after a ``refused`` event) when CONNACK is not 0.
        """
        self.load()
        tokens = self._tokens
        if tokens is None:
            raise DeviceSimError(f"{self.client_id} holds no access token; pair or refresh first")
        self.disconnect("reconnect")
        assert self._key is not None and self._state is not None
        proof = connect_proof(self._key, self.audience, tokens.access_token, now=self.now(),
                              nonce=self._state.dpop_nonce)
        session = Session(self.client_id, self.host, self.port, username=self.client_id,
                          password=f"{tokens.access_token} {proof}", keepalive=self.keepalive)
        session.when_lost(self._session_lost)
        try:
            session.open(self.request_timeout)
        except ConnectRefused as exc:
            self._emit(ev.REFUSED, what="connect", code=exc.code, reason=exc.reason)
            raise
        with self._lock:
            self._auth, self._auth_requester, self._auth_channel_ok = session, None, True
        self._emit(ev.CONNECTED, client_id=self.client_id, host=self.host, port=self.port, scope=tokens.scope)
        self._close_bootstrap()
        self._take_up_roles(session)

    def _take_up_roles(self, session: Session) -> None:
        scopes = self.granted_scopes
        if READ_TEMPERATURE in scopes:
            self._subscribe(session, ALL_TEMPERATURES, self._on_temperature)
        if DEVICE_POWER in scopes and self._subscribe(session, power_set_topic(self.client_id),
                                                      self._on_power_command):
            self.publish_power_state()

    def _subscribe(self, session: Session, topic_filter: str, handler: Callable[[str, bytes], None]) -> bool:
        granted = session.subscribe(topic_filter, handler, timeout=self.request_timeout)
        if granted == SUBACK_FAILURE:
            self._emit(ev.REFUSED, what="subscribe", topic=topic_filter, code=granted,
                       reason="not authorized")
            return False
        self._emit(ev.SUBSCRIBED, topic=topic_filter, qos=granted)
        return True

    def _session_lost(self, session: Session) -> None:
        if session is self._auth:
            self._emit(ev.DISCONNECTED, reason="lost", detail=session.lost_reason)
            self._wake.set()

    def disconnect(self, reason: str = "requested") -> None:
        """Close the authenticated session, if any (``disconnected`` event with ``reason``)."""
        with self._lock:
            session, self._auth, self._auth_requester = self._auth, None, None
        if session is None:
            return
        was_up = session.connected
        session.close()
        if was_up:
            self._emit(ev.DISCONNECTED, reason=reason)

    # -- role actions -----------------------------------------------------------
    def publish_json(self, topic: str, payload: dict[str, Any], wait: float | None = None) -> None:
        """Publish a JSON object on the authenticated session (QoS 1); the broker decides whether it is allowed."""
        self._publish_json(topic, payload, wait)

    def _publish_json(self, topic: str, payload: dict[str, Any], wait: float | None = None) -> None:
        session = self._auth
        if session is None or not session.connected:
            raise DeviceSimError(f"{self.client_id} is not connected")
        session.publish(topic, json.dumps(payload, separators=(",", ":")).encode("utf-8"), qos=1, wait=wait)
        self._emit(ev.PUBLISHED, topic=topic, payload=payload)

    def publish_reading(self, *, wait: float | None = None) -> dict[str, Any]:
        """Publish ``{"celsius": .., "ts": ..}`` to home/<client_id>/temperature (QoS 1)."""
        reading = {"celsius": self._thermometer.read(), "ts": int(self.now())}
        self._publish_json(temperature_topic(self.client_id), reading, wait)
        return reading

    def publish_power_state(self, *, wait: float | None = None) -> None:
        """Publish ``{"power": "on"|"off", "ts": ..}`` to home/<client_id>/power/state."""
        self._publish_json(power_state_topic(self.client_id), {"power": self._power, "ts": int(self.now())},
                           wait)

    def send_power_command(self, target_client_id: str, state: str) -> None:
        """As a panel with ``control:power``: publish ``{"power": state}`` to home/<target>/power/set."""
        check_client_id(target_client_id)
        if state not in ("on", "off"):
            raise ValueError("power state must be 'on' or 'off'")
        self._publish_json(power_set_topic(target_client_id), {"power": state}, wait=self.request_timeout)

    def set_power(self, state: str) -> None:
        """Switch power ``on``/``off``, emit ``power`` and report the state when connected."""
        if state not in ("on", "off"):
            raise ValueError("power state must be 'on' or 'off'")
        self._power = state
        self._emit(ev.POWER, state=state)
        if self.connected:
            self.publish_power_state()

    def _on_power_command(self, topic: str, payload: bytes) -> None:
        self._emit(ev.RECEIVED, topic=topic, payload=decode_payload(payload))
        command = parse_power_command(payload)
        if command is None:
            log.warning("%s: ignored power command %r", self.client_id, payload[:64])
            return
        self.set_power(command)

    def _on_temperature(self, topic: str, payload: bytes) -> None:
        self._emit(ev.RECEIVED, topic=topic, payload=decode_payload(payload))

    # -- orchestration ----------------------------------------------------------
    def run(self, once: bool = False) -> None:
        """Pair or refresh, connect, act out the role, refresh and reconnect, until stop().

        With ``once``: connect, publish one reading (and the power state), return.
        Raises PairingError, ConnectRefused (twice in a row), or other DeviceSimError.
        """
        self._runner = threading.current_thread()
        self._idle.clear()
        failure: BaseException | None = None
        try:
            self.load()
            self._run_rounds(once)
        except DeviceStopped:
            pass
        except Exception as exc:
            failure = exc
            raise
        finally:
            self._shutdown()
            self._emit(ev.STOPPED, error=str(failure) if failure else None)
            self._runner = None
            self._idle.set()  # last: stop() returns once ``stopped`` has been reported

    def _run_rounds(self, once: bool) -> None:
        refusals = 0
        attempt = 0
        while not self._stop.is_set():
            if self._auth is not None and self._auth.lost.is_set():
                self._tokens = None  # the broker closed the session: revoked or expired, perhaps; refresh
            try:
                self._ensure_tokens()
                self.connect()
            except ConnectRefused as exc:
                if exc.code != SERVER_UNAVAILABLE:
                    refusals += 1
                    if refusals >= 2:
                        raise
                    self._tokens = None  # a new access token and a fresh nonce, then one more try
                    continue
                if once:
                    raise
                attempt += 1  # CONNACK 3: the broker limits CONNECTs from this address; wait and retry
                self._emit(ev.ERROR, message=str(exc), retry_in=backoff_delay(attempt))
                self._pause(backoff_delay(attempt))
                continue
            except _TRANSIENT as exc:
                if once:
                    raise
                attempt += 1
                self._emit(ev.ERROR, message=str(exc), retry_in=backoff_delay(attempt))
                self._pause(backoff_delay(attempt))
                continue
            refusals = attempt = 0
            if once:
                self._act_once()
                return
            self._serve()

    def _ensure_tokens(self) -> None:
        tokens = self._tokens
        if tokens is not None and tokens.expires_at > self.now():
            return
        assert self._state is not None
        if self._state.refresh_token is not None:
            try:
                self.refresh()
                return
            except ServiceError as exc:
                if exc.error != "invalid_grant":
                    raise
        self.pair()

    def _act_once(self) -> None:
        if WRITE_TEMPERATURE in self.granted_scopes:
            self.publish_reading(wait=self.request_timeout)
        self.disconnect("once")

    def _serve(self) -> str:
        """Act out the role until the session must be replaced: ``refreshed``, ``lost`` or ``grant_lost``."""
        session = self._auth
        tokens = self._tokens
        assert session is not None and tokens is not None
        publishes = WRITE_TEMPERATURE in self.granted_scopes
        next_reading = self.now()
        refresh_at = tokens.refresh_at
        while True:
            self._wake.clear()
            if self._stop.is_set():
                raise DeviceStopped()
            if session.lost.is_set():
                return "lost"
            now = self.now()
            if now >= refresh_at:
                outcome = self._refresh_connected()
                if outcome != "retry":
                    return outcome
                refresh_at = now + REFRESH_RETRY
                continue
            if publishes and now >= next_reading:
                next_reading = now + self.interval
                try:
                    self.publish_reading()
                except (DeviceSimError, ConnectionError) as exc:
                    log.info("%s: reading not published: %s", self.client_id, exc)
            due = min(refresh_at, next_reading) if publishes else refresh_at
            self._wake.wait(min(max(due - now, 0.0), MAX_WAIT_SLICE))

    def _refresh_connected(self) -> str:
        try:
            self.refresh()
        except _TRANSIENT as exc:  # before ServiceError: ServiceBusy is one, and is worth a retry
            self._auth_channel_ok = False  # a half-open connection, perhaps: retry over a bootstrap session
            self._emit(ev.ERROR, message=f"refresh failed: {exc}", retry_in=REFRESH_RETRY)
            return "retry"
        except ServiceError as exc:
            if exc.error != "invalid_grant":
                raise
            self.disconnect("grant_lost")
            return "grant_lost"
        self.disconnect("refresh")
        return "refreshed"

    def _pause(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise DeviceStopped()

    def _shutdown(self) -> None:
        self.disconnect("stopped")
        self._close_bootstrap()

    def start(self, once: bool = False) -> threading.Thread:
        """Run in a daemon thread; a failure is kept in :attr:`error` (and in the ``stopped`` event)."""
        def target() -> None:
            try:
                self.run(once=once)
            except BaseException as exc:  # reported through self.error
                self.error = exc
        thread = threading.Thread(target=target, name=f"device-{self.client_id}", daemon=True)
        self._idle.clear()  # so that an immediate stop() waits for the thread's clean-up
        thread.start()
        return thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop waiting, disconnect cleanly, close every connection. Safe from any thread.

        When :meth:`run` is active in another thread, wait (up to ``timeout``) until
        it has closed its connections. A stopped device stays stopped.
        """
        self._stop.set()
        self._wake.set()
        for requester in (self._auth_requester, self._boot_requester):
            if requester is not None:
                requester.fail_all(DeviceStopped())
        if self._runner is threading.current_thread():
            return  # run() cleans up on its way out
        if not getattr(self._in_callback, "active", False):  # on paho's thread, waiting would deadlock
            self._idle.wait(timeout)
        if self._idle.is_set():
            self._shutdown()  # idempotent; covers steps driven without run()
