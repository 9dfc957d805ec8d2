"""Grant handlers for the token endpoint: `GRANTS = {grant_type: handler}` (RFC 8628 3.4, RFC 6749 6).

Each handler reads as a straight list of steps. Parameter checks (`params`)
run before the DPoP proof is verified, following protocol.md's order of checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authsvc import device_flow
from authsvc.dpop import Proof
from authsvc.errors import InvalidGrant, InvalidScope
from authsvc.keys import keyed_hash
from authsvc.store import Grant, RefreshToken

if TYPE_CHECKING:
    from authsvc.service import AuthService

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"


@dataclass(frozen=True)
class GrantType:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    handle: Callable[[AuthService, dict[str, str], Proof, float], dict[str, Any]]


def device_code_grant(svc: AuthService, params: dict[str, str], proof: Proof, now: float) -> dict[str, Any]:
    code_hash = svc.hash_device_code(params["device_code"])
    code = device_flow.check_binding(svc.store.device_code(code_hash), params["client_id"], proof.jkt)
    outcome = svc.polls.poll(code, now)  # counted in memory (device_flow.PollMemory), not in the database
    if outcome is not None:
        raise outcome.error
    with svc.store.transaction():
        if not svc.store.consume_device_code(code_hash):
            raise InvalidGrant("Unknown or already used device_code", detail="lost a race to redeem the code")
        assert code.sub is not None
        grant = svc.store.add_grant(code.client_id, code.sub, code.scope, proof.jkt, now)
        refresh = svc.new_refresh_token(grant.grant_id, proof.jkt, code.scope, now)
        response = svc.token_response(grant, code.scope, now, refresh)
    # One device, one grant: a new pairing replaces the old one, whose key may be gone or stolen.
    for old in svc.store.live_grants(code.client_id):
        if old.grant_id != grant.grant_id:
            svc.revoke_grant(old.grant_id, "replaced by a new pairing", now)
    return response


def scope_within(allowed: str, requested: str | None, refusal: str) -> str:
    """The requested scopes, all of which must be in `allowed` (in allowed's order); none asked: all of them."""
    if requested is None:
        return allowed
    wanted = requested.split()
    if not wanted or not set(wanted) <= set(allowed.split()):
        raise InvalidScope(refusal, detail=f"{requested!r} is not within {allowed!r}")
    return " ".join(s for s in allowed.split() if s in wanted)


def refresh_token_grant(svc: AuthService, params: dict[str, str], proof: Proof, now: float) -> dict[str, Any]:
    token_hash = keyed_hash(svc.keys.secrets["refresh_hmac"], params["refresh_token"], "refresh")
    token = svc.store.refresh_token(token_hash)
    grant = svc.store.grant(token.grant_id) if token else None
    if token is None or grant is None or grant.client_id != params["client_id"]:
        raise InvalidGrant(detail="unknown refresh token or another client's")
    if token.jkt != proof.jkt:  # a thief without the key changes nothing
        raise InvalidGrant("The refresh token is bound to another key")
    if grant.revoked is not None:
        raise InvalidGrant(detail=f"grant {grant.grant_id} was revoked")
    scope = scope_within(token.scope, params.get("scope"), "A refresh may narrow the scope, never widen it")
    if now >= token.expires:
        raise InvalidGrant("The refresh token has expired")
    check_absolute_lifetime(grant, svc.settings.refresh_absolute_days, now)
    if token.used is None:
        successor = svc.mint_refresh_token()
        with svc.store.transaction():
            if svc.store.mark_rotated(token_hash, now, svc.hash_refresh(successor), svc.seal_successor(successor)):
                svc.store.add_refresh_token(svc.refresh_row(successor, grant.grant_id, token.jkt, token.scope, now))
                return svc.token_response(grant, scope, now, successor)
        token = svc.store.refresh_token(token_hash)  # lost the race: fall through to the retry rules
        assert token is not None
    return _replayed(svc, token, grant, scope, now)


def check_absolute_lifetime(grant: Grant, days: int, now: float) -> None:
    """Optional (tokens.refresh_absolute_days, 0 = none): however often it is used, a grant ends this long
    after its approval; the idle lifetime is each refresh token's own expiry (tokens.refresh_ttl_days)."""
    if days and now >= grant.created + days * 86400:
        raise InvalidGrant("The grant has reached its maximum lifetime; pair the device again",
                           detail=f"grant {grant.grant_id} is older than {days} days")


def _replayed(svc: AuthService, token: RefreshToken, grant: Grant, scope: str, now: float) -> dict[str, Any]:
    """A replaced token again: the same successor within the grace period while unused, else revoke the grant."""
    successor = svc.store.refresh_token(token.successor_hash or "")
    in_grace = token.used is not None and now - token.used <= svc.settings.refresh_grace
    if in_grace and successor is not None and successor.used is None and token.successor_sealed:
        return svc.token_response(grant, scope, now, svc.open_successor(token.successor_sealed))
    svc.revoke_grant(grant.grant_id, "refresh token reused", now)
    raise InvalidGrant("The refresh token was already used; the grant has been revoked")


GRANTS: dict[str, GrantType] = {
    DEVICE_CODE_GRANT: GrantType(("device_code", "client_id"), (), device_code_grant),
    REFRESH_GRANT: GrantType(("refresh_token", "client_id"), ("scope",), refresh_token_grant),
}
