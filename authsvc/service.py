"""The authorization service, transport-neutral: `handle(endpoint, params, now)`.

Endpoints are the protocol's request topics (protocol.md sections 2-5):
device authorization (RFC 8628 3.1-3.2), token (GRANTS), revocation (RFC 7009).
Approval and CONNECT checks live here too, so the page, the CLI and the broker
plugin share one code path. Raises OAuthError; adapters render it.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authsvc import device_flow
from authsvc.config import Settings
from authsvc.dpop import DPoPVerifier, NonceIssuer, Proof, RestartGuard
from authsvc.errors import (
    ExpiredUserCode,
    InvalidClient,
    InvalidDPoPProof,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    RegistrationError,
    TemporarilyUnavailable,
    UnknownUserCode,
    UnsupportedGrantType,
    UsedUserCode,
)
from authsvc.grants import GRANTS, scope_within
from authsvc.keyring import KeyRing
from authsvc.jws_compact import b64u_decode_strict
from authsvc.keys import keyed_hash
from authsvc.store import DeviceCode, Grant, RefreshToken, Store
from authsvc.tokens import AccessClaims, TokenError, issue_access_token, verify_access_token
from broker.acl import valid_identity

log = logging.getLogger("iotauth.service")

ENDPOINTS = ("device_authorization", "token", "revoke")
MAX_PARAM_CHARS = 4096
# Pending pairing codes. A device needs one. Counted per client AND address, so a host that guesses a
# client_id (they are not secret) cannot stop that device from pairing; the per-client total only bounds
# the database against a flood from many addresses.
PENDING_PER_SOURCE = 20
MAX_PENDING_CODES = 200
MAX_PENDING_KEYS = 10_000  # (client, address) pairs remembered; the stalest are forgotten first
# Pending codes whose polling state is kept in memory (device_flow.PollMemory, ~200 bytes each): entries
# exist only for pending codes of registered clients (MAX_PENDING_CODES each); past this many, the least
# recently polled is forgotten, which costs that device at most one early poll that is not flagged.
MAX_POLLED_CODES = 10_000


@dataclass(frozen=True)
class PendingRequest:
    user_code: str
    client_id: str
    client_name: str
    scopes: list[tuple[str, str]]  # (scope, plain-words description)
    expires: float


@dataclass(frozen=True)
class ConnectedDevice:
    client_id: str
    sub: str
    scopes: list[str]
    exp: float
    jti: str
    grant_id: str
    jkt: str


class ConnectRefused(Exception):
    """CONNECT refused; `code` is the CONNACK return code, the message is for the log only."""

    def __init__(self, reason: str, code: int = 5) -> None:
        super().__init__(reason)
        self.code = code


def _string_params(params: dict[str, Any], names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        if name not in params:
            if name in required:
                raise InvalidRequest(f"Missing parameter {name}")
            continue
        value = params[name]
        if not isinstance(value, str):
            raise InvalidRequest(f"Parameter {name} must be a string")
        if len(value) > MAX_PARAM_CHARS:
            raise InvalidRequest(f"Parameter {name} is too long")
        out[name] = value
    return out


class AuthService:
    def __init__(self, settings: Settings, store: Store, keys: KeyRing) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        # A fresh nonce secret per process: the jti memory lives in memory, so after a restart no nonce
        # (and so no nonce-bearing proof) from before it may be accepted again.
        nonces = NonceIssuer(secrets.token_bytes(32), settings.nonce_step)
        self.dpop = DPoPVerifier(nonces, algorithms=settings.dpop_algorithms, window=settings.iat_window,
                                 per_source=settings.max_proofs_per_source, restart_guard=self._restart_guard(),
                                 trusted=self.store.key_has_live_grant)
        self.on_revocation: list[Callable[[], None]] = []
        # Last poll and current interval of pending device codes: in this process, not in the database (an
        # fsync per poll). Empty after a restart: each code's first poll then is simply not flagged.
        self.polls = device_flow.PollMemory(MAX_POLLED_CODES)
        self._pending: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # (client, address) -> expiries

    def _restart_guard(self) -> RestartGuard:
        """Proofs without a nonce seen by an earlier process stay refused here (see dpop.RestartGuard)."""
        def persist(horizon: float) -> None:
            try:
                self.store.raise_no_nonce_horizon(horizon)
            except sqlite3.OperationalError as exc:  # locked by another process: refuse, never accept unrecorded
                raise TemporarilyUnavailable(detail=f"cannot record the DPoP restart horizon: {exc}") from None

        return RestartGuard(self.store.no_nonce_horizon(), persist, ahead=3 * self.settings.iat_window)

    # -- helpers shared by the grants ---------------------------------------------
    def topic(self, endpoint: str) -> str:
        return f"{self.settings.prefix}/{endpoint}"

    def current_nonce(self, now: float) -> str:
        return self.dpop.nonces.current(now)

    def hash_device_code(self, code: str) -> str:
        return keyed_hash(self.keys.secrets["device_code_hmac"], code, "device_code")

    def hash_refresh(self, token: str) -> str:
        return keyed_hash(self.keys.secrets["refresh_hmac"], token, "refresh")

    def seal_successor(self, token: str) -> str:
        return self.keys.sealer.seal(token.encode(), "refresh-successor")

    def open_successor(self, sealed: str) -> str:
        return self.keys.sealer.open(sealed, "refresh-successor").decode()

    def refresh_row(self, token: str, grant_id: str, jkt: str, scope: str, now: float) -> RefreshToken:
        return RefreshToken(self.hash_refresh(token), grant_id, jkt, scope, now, now + self.settings.refresh_ttl,
                            None, None, None)

    @staticmethod
    def mint_refresh_token() -> str:
        return secrets.token_urlsafe(32)  # 256 bits of randomness

    def new_refresh_token(self, grant_id: str, jkt: str, scope: str, now: float) -> str:
        token = self.mint_refresh_token()
        self.store.add_refresh_token(self.refresh_row(token, grant_id, jkt, scope, now))
        return token

    def token_response(self, grant: Grant, scope: str, now: float, refresh_token: str) -> dict[str, Any]:
        key = self.keys.active
        token, claims = issue_access_token(key, issuer=self.settings.issuer, audience=self.settings.audience,
                                          sub=grant.sub, client_id=grant.client_id, scope=scope, jkt=grant.jkt,
                                          now=now, ttl=self.settings.access_ttl)
        self.store.add_access_token(claims["jti"], grant.grant_id, grant.client_id, claims["exp"])
        log.info("issued tokens to %s (grant %s, scope %r)", grant.client_id, grant.grant_id[:8], scope)
        return {"access_token": token, "token_type": "DPoP", "expires_in": self.settings.access_ttl,
                "scope": scope, "refresh_token": refresh_token}

    def _pending_from(self, client_id: str, source: str, now: float) -> list[float]:
        """Expiry times of the codes this address asked for this client that may still be pending (in memory:
        after a restart an address simply starts afresh)."""
        key = (client_id, source)
        live = [t for t in self._pending.pop(key, []) if t > now]
        self._pending[key] = live
        if len(self._pending) > MAX_PENDING_KEYS:
            self._pending.popitem(last=False)
        return live

    def require_client(self, client_id: str) -> dict[str, Any]:
        client = self.store.client(client_id) if valid_identity(client_id) else None
        if client is None:
            raise InvalidClient(detail=f"unknown client_id {client_id!r}")
        return client

    def verify_request_proof(self, proof: Any, endpoint: str, now: float, source: str) -> Proof:
        return self.dpop.verify(proof, htm="PUBLISH", htu=self.topic(endpoint), now=now, source=source)

    # -- the three endpoints --------------------------------------------------------
    def handle(self, endpoint: str, params: dict[str, Any], now: float, source: str = "") -> dict[str, Any]:
        """`source` is the requester's network address: it bounds how many proofs one host can make us keep."""
        if endpoint == "device_authorization":
            return self.device_authorization(params, now, source)
        if endpoint == "token":
            return self.token(params, now, source)
        if endpoint == "revoke":
            return self.revoke(params, now, source)
        raise InvalidRequest(f"Unknown endpoint {endpoint}")

    def device_authorization(self, params: dict[str, Any], now: float, source: str = "") -> dict[str, Any]:
        p = _string_params(params, ("client_id", "scope"), ("client_id",))
        client = self.require_client(p["client_id"])
        scope = scope_within(client["scope"], p.get("scope"),
                             "The requested scope is not among the scopes registered for this client")
        jkt = self.verify_request_proof(params["dpop"], "device_authorization", now, source).jkt \
            if "dpop" in params else None
        from_here = self._pending_from(client["client_id"], source, now)
        if len(from_here) >= PENDING_PER_SOURCE:
            raise TemporarilyUnavailable("Too many pairing requests are pending for this client; retry later",
                                         detail=f"{source!r} has {PENDING_PER_SOURCE} pending codes for "
                                                f"{client['client_id']}")
        if self.store.pending_device_codes(client["client_id"], now) >= MAX_PENDING_CODES:
            raise TemporarilyUnavailable("Too many pairing requests are pending for this client; retry later",
                                         detail=f"{client['client_id']} has {MAX_PENDING_CODES} pending codes")
        from_here.append(now + self.settings.device_code_ttl)
        device_code = device_flow.new_device_code()
        s = self.settings
        while True:
            user_code = device_flow.new_user_code()
            row = DeviceCode(self.hash_device_code(device_code), user_code, client["client_id"], scope, jkt, now,
                             now + s.device_code_ttl, s.poll_interval, "pending", None)
            if self.store.add_device_code(row):
                break
        log.info("device authorization for %s: user code issued, scope %r", client["client_id"], scope)
        return {"device_code": device_code, "user_code": user_code, "verification_uri": s.verification_uri,
                "verification_uri_complete": f"{s.verification_uri}?user_code={user_code}",
                "expires_in": s.device_code_ttl, "interval": s.poll_interval}

    def token(self, params: dict[str, Any], now: float, source: str = "") -> dict[str, Any]:
        grant_type = params.get("grant_type")
        if not isinstance(grant_type, str):
            raise InvalidRequest("Missing parameter grant_type" if grant_type is None
                                 else "Parameter grant_type must be a string")
        handler = GRANTS.get(grant_type)
        if handler is None:
            raise UnsupportedGrantType(detail=f"grant_type {grant_type[:80]!r}")
        p = _string_params(params, handler.required + handler.optional, handler.required)
        self.require_client(p["client_id"])
        if "dpop" not in params:
            raise InvalidDPoPProof("A DPoP proof is required")
        proof = self.verify_request_proof(params["dpop"], "token", now, source)
        return handler.handle(self, p, proof, now)

    def revoke(self, params: dict[str, Any], now: float, source: str = "") -> dict[str, Any]:
        p = _string_params(params, ("token", "token_type_hint", "client_id"), ("token", "client_id"))
        self.require_client(p["client_id"])
        proof = self.verify_request_proof(params["dpop"], "revoke", now, source) if "dpop" in params else None
        if not self._revoke_refresh(p, proof, now):
            self._revoke_access(p, proof, now)
        return {}

    def _check_revoker(self, owner_client: str, bound_jkt: str | None, p: dict[str, str], proof: Proof | None) -> None:
        if owner_client != p["client_id"]:
            raise InvalidGrant("The token was issued to another client")
        if bound_jkt is not None and proof is None:
            raise InvalidDPoPProof("A proof by the token's key is required to revoke it")
        if bound_jkt is not None and proof is not None and proof.jkt != bound_jkt:
            raise InvalidGrant("The token is bound to another key")

    def _revoke_refresh(self, p: dict[str, str], proof: Proof | None, now: float) -> bool:
        token = self.store.refresh_token(self.hash_refresh(p["token"]))
        grant = self.store.grant(token.grant_id) if token else None
        if token is None or grant is None:
            return False
        self._check_revoker(grant.client_id, token.jkt, p, proof)
        self.revoke_grant(grant.grant_id, "refresh token revoked by the device", now)
        return True

    def _revoke_access(self, p: dict[str, str], proof: Proof | None, now: float) -> None:
        try:
            claims = verify_access_token(p["token"], self.keys.verification_keys(), issuer=self.settings.issuer,
                                         audience=self.settings.audience, now=now)
        except TokenError:
            return  # RFC 7009 2.2: an invalid or expired token is answered with success
        self._check_revoker(claims.client_id, claims.jkt, p, proof)
        if self.store.revoke_access_token(claims.jti, now):
            self._notify()

    # -- revocation ---------------------------------------------------------------------
    def _notify(self) -> None:
        for callback in self.on_revocation:
            callback()

    def revoke_grant(self, grant_id: str, reason: str, now: float) -> bool:
        done = self.store.revoke_grant(grant_id, reason, now)
        if done:
            log.warning("grant %s revoked: %s", grant_id[:8], reason)
            self._notify()
        return done

    def revoke_client(self, client_id: str, now: float) -> int:
        grants = self.store.live_grants(client_id)
        return sum(self.revoke_grant(g.grant_id, "revoked by the owner", now) for g in grants)

    # -- approval (the page and the CLI) -----------------------------------------------------
    def _code_for_decision(self, entered: str, now: float) -> DeviceCode:
        user_code = device_flow.normalize_user_code(entered)
        code = self.store.device_code_by_user_code(user_code) if user_code else None
        if code is None:
            raise UnknownUserCode()
        if code.status != "pending":
            raise UsedUserCode()
        if now >= code.expires:
            raise ExpiredUserCode()
        return code

    def pending_request(self, entered: str, now: float) -> PendingRequest:
        code = self._code_for_decision(entered, now)
        client = self.store.client(code.client_id)
        catalogue = self.settings.scopes
        scopes = [(s, catalogue[s].description if s in catalogue else s) for s in code.scope.split()]
        return PendingRequest(code.user_code, code.client_id, client["name"] if client else code.client_id,
                              scopes, code.expires)

    def decide(self, entered: str, user: str, approve: bool, now: float) -> PendingRequest:
        request = self.pending_request(entered, now)
        if not self.store.decide(request.user_code, "approved" if approve else "denied", user, now):
            raise UsedUserCode()  # decided by someone else in the meantime
        log.info("user %s %s %s for %s", user, "approved" if approve else "denied", request.user_code,
                 request.client_id)
        return request

    # -- clients ---------------------------------------------------------------------------
    def register_client(self, client_id: str, scope: str, name: str | None, now: float) -> None:
        if not valid_identity(client_id):
            raise RegistrationError(f"client id {client_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        scopes = scope.split()
        if not scopes:
            raise RegistrationError("--scope must name at least one scope")
        unknown = [s for s in scopes if s not in self.settings.scopes]
        if unknown:
            raise RegistrationError(f"unknown scope {unknown[0]!r} (known: {', '.join(sorted(self.settings.scopes))})")
        if not self.store.add_client(client_id, name or client_id, " ".join(dict.fromkeys(scopes)), now):
            raise RegistrationError(f"client {client_id!r} is already registered")

    def remove_client(self, client_id: str, now: float) -> None:
        if self.store.client(client_id) is None:
            raise RegistrationError(f"no client {client_id!r}")
        self.revoke_client(client_id, now)
        self.store.remove_client(client_id)

    # -- CONNECT (protocol section 6), called by the broker plugin ---------------------------
    def authorize_connect(self, client_id: str, username: str | None, password: str, now: float,
                          source: str = "") -> ConnectedDevice:
        if not valid_identity(client_id):
            raise ConnectRefused(f"ClientId {client_id[:80]!r} is not a valid client_id")
        if username != client_id:
            raise ConnectRefused("username differs from ClientId")
        token, sep, proof = password.partition(" ")
        if not sep or not proof:
            raise ConnectRefused("password lacks the DPoP proof (token alone is refused)")
        try:
            claims = verify_access_token(token, self.keys.verification_keys(), issuer=self.settings.issuer,
                                         audience=self.settings.audience, now=now)
        except TokenError as exc:
            raise ConnectRefused(f"access token refused: {exc}") from None
        if claims.client_id != client_id:
            raise ConnectRefused(f"token of {claims.client_id!r} presented with ClientId {client_id!r}")
        if claims.jkt is None:
            raise ConnectRefused("token is not DPoP-bound")
        try:
            proof_result = self.dpop.verify(proof, htm="CONNECT", htu=self.settings.audience, now=now,
                                            access_token=token, source=source)
        except OAuthError as exc:
            raise ConnectRefused(f"CONNECT proof refused: {exc.detail}") from None
        if proof_result.jkt != claims.jkt:
            raise ConnectRefused("proof key is not the token's cnf.jkt")
        return self._live_device(claims, now)

    def live_token_jti(self, client_id: str, password: str, now: float) -> str | None:
        """Cheap, unverified pre-check: the `jti` of a live access token we issued to this client, if the
        password carries one.

        Used only to let a device through a per-source CONNECT limit without spending two signature
        checks on every attempt of a flood; `authorize_connect` still verifies everything."""
        jti = unverified_jti(password.partition(" ")[0])
        record = self.store.access_token(jti) if jti else None
        live = (record is not None and record["revoked"] is None and record["exp"] > now
                and record["client_id"] == client_id)
        return jti if live else None

    def _live_device(self, claims: AccessClaims, now: float) -> ConnectedDevice:
        record = self.store.live_access_token(claims.jti, claims.client_id)
        if record is None:
            raise ConnectRefused("token or grant revoked, or client no longer registered")
        assert claims.jkt is not None
        return ConnectedDevice(claims.client_id, claims.sub, claims.scopes, claims.exp, claims.jti,
                               record["grant_id"], claims.jkt)

    def maintenance(self, now: float) -> None:
        """Forget what can no longer be used: old device codes, expired access-token records, sealed successors."""
        self.store.purge_device_codes(now - 86400)
        self.polls.sweep(now)
        self.store.purge_access_tokens(now - 3600)
        self.store.forget_expired_successors(now - self.settings.refresh_grace)


def unverified_jti(token: str) -> str | None:
    """The `jti` claim of a compact JWT, read without verifying anything (hostile input: bounded, no raise)."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 4096:
        return None
    try:
        claims = json.loads(b64u_decode_strict(parts[1]))
    except (ValueError, RecursionError):
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) and 0 < len(jti) <= 256 else None
