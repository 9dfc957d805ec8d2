"""DPoP proofs over MQTT (RFC 9449 section 4.3 checklist, protocol.md section 4).

One `DPoPVerifier` serves both the service and the broker, so they accept the
same nonces and share one `jti` memory. Every check is a small named function;
`now` is passed in.

Replay protection has three parts: the `jti` memory keeps each proof until the
last moment it could still be accepted (and at least 10 minutes); each process
draws a fresh nonce secret, so no nonce-bearing proof outlives a restart; and a
`RestartGuard` carries the one remaining gap, proofs without a nonce, across a
restart (see its docstring).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey

from authsvc.errors import InvalidDPoPProof, TemporarilyUnavailable, UseDPoPNonce
from authsvc.keys import b64u, b64u_decode

MAX_PROOF_BYTES = 4096
MAX_JTI_CHARS = 64  # protocol.md section 4; bounds what one entry of the jti memory can cost
MIN_JTI_RETENTION = 600  # protocol.md section 4: the jti memory keeps each entry at least 10 minutes
JTI_CAPACITY = 200_000  # entries in all (a few hundred bytes each); when full, new proofs are refused
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# algorithm -> (kty, crv) its key must have; asymmetric only
KEY_TYPES = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}


@dataclass(frozen=True)
class Proof:
    jkt: str
    jti: str
    iat: float
    nonce: str | None
    claims: dict[str, Any]


def ath_of(access_token: str) -> str:
    return b64u(hashlib.sha256(access_token.encode("ascii")).digest())


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members only, in lexicographic order."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}
    members = required.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise InvalidDPoPProof(detail="jwk lacks the members its kty requires")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canonical.encode()).digest())


# -- the checklist, one function per item -------------------------------------------
def split_proof(proof: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(proof, str) or not proof:
        raise InvalidDPoPProof("The DPoP proof must be a JWT string")
    if len(proof) > MAX_PROOF_BYTES:
        raise InvalidDPoPProof(f"The DPoP proof exceeds {MAX_PROOF_BYTES} bytes")
    parts = proof.split(".")
    if len(parts) != 3:
        raise InvalidDPoPProof("The DPoP proof is not a compact JWS")
    try:
        header = json.loads(b64u_decode(parts[0]))
        claims = json.loads(b64u_decode(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested JSON
        raise InvalidDPoPProof("The DPoP proof is not well-formed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidDPoPProof("The DPoP proof is not well-formed")
    return header, claims


def check_typ(header: dict[str, Any]) -> None:
    if header.get("typ") != "dpop+jwt":
        raise InvalidDPoPProof("The DPoP proof must have typ dpop+jwt")


def check_alg(header: dict[str, Any], allowed: tuple[str, ...]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed or alg not in KEY_TYPES:
        raise InvalidDPoPProof(f"The DPoP proof algorithm must be one of {', '.join(allowed)}")
    return alg


def check_public_jwk(header: dict[str, Any], alg: str) -> ECKey | OKPKey:
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidDPoPProof("The DPoP proof header must carry a jwk")
    if PRIVATE_JWK_MEMBERS & jwk.keys():
        raise InvalidDPoPProof("The DPoP proof jwk must not contain private key members")
    kty, crv = KEY_TYPES[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        raise InvalidDPoPProof(f"The DPoP proof jwk must be a {kty} {crv} key for {alg}")
    try:
        return ECKey.import_key(jwk) if kty == "EC" else OKPKey.import_key(jwk)
    except (JoseError, ValueError, TypeError):
        raise InvalidDPoPProof("The DPoP proof jwk is not a valid public key") from None


def check_signature(proof: str, key: ECKey | OKPKey, alg: str) -> None:
    try:
        jws.deserialize_compact(proof, key, algorithms=[alg])
    except (JoseError, ValueError, TypeError):
        raise InvalidDPoPProof("The DPoP proof signature does not verify") from None


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float, e.g. 10**400
        return False


def check_claim_types(claims: dict[str, Any]) -> None:
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
        raise InvalidDPoPProof(f"The DPoP proof jti must be a string of 1-{MAX_JTI_CHARS} characters")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, (int, float)) or not _finite(iat):
        raise InvalidDPoPProof("The DPoP proof iat must be a number")
    if "nonce" in claims and not isinstance(claims["nonce"], str):
        raise InvalidDPoPProof("The DPoP proof nonce must be a string")


def check_htm_htu(claims: dict[str, Any], htm: str, htu: str) -> None:
    if claims.get("htm") != htm:
        raise InvalidDPoPProof(f"The DPoP proof htm must be {htm}")
    if claims.get("htu") != htu:
        raise InvalidDPoPProof(f"The DPoP proof htu must be {htu}")


def check_ath(claims: dict[str, Any], access_token: str | None) -> None:
    if access_token is None:
        if "ath" in claims:
            raise InvalidDPoPProof("The DPoP proof carries ath but no access token was presented")
        return
    ath = claims.get("ath")
    if not isinstance(ath, str) or not hmac.compare_digest(ath, ath_of(access_token)):
        raise InvalidDPoPProof("The DPoP proof ath does not match the access token")


class NonceIssuer:
    """Stateless server nonces: a MAC over the current fixed time step; the step before stays valid."""

    def __init__(self, secret: bytes, step: int) -> None:
        self._secret = secret
        self._step = step

    def _for_step(self, step: int) -> str:
        return b64u(hmac.new(self._secret, f"dpop-nonce:{step}".encode(), hashlib.sha256).digest()[:24])

    def current(self, now: float) -> str:
        return self._for_step(int(now // self._step))

    def valid_until(self, nonce: str, now: float) -> float | None:
        """None for an invalid nonce; else the end of its validity: the end of the step after its own."""
        if not nonce.isascii():  # ours are base64url; also keeps a lone surrogate away from encode()
            return None
        step = int(now // self._step)
        for s in (step, step - 1):
            if hmac.compare_digest(nonce.encode(), self._for_step(s).encode()):
                return float((s + 2) * self._step)
        return None

    def is_valid(self, nonce: str, now: float) -> bool:
        return self.valid_until(nonce, now) is not None


def check_freshness(claims: dict[str, Any], nonces: NonceIssuer, now: float, window: int) -> float:
    """A valid server nonce, or an iat within `window` of now. Returns the last moment the proof is acceptable."""
    nonce = claims.get("nonce")
    if nonce is not None:
        until = nonces.valid_until(nonce, now)
        if until is None:
            raise UseDPoPNonce("The DPoP nonce is not valid; use the dpop_nonce of this response")
        return until
    iat = float(claims["iat"])
    if abs(now - iat) > window:
        raise UseDPoPNonce("The DPoP proof iat is outside the acceptance window; use the dpop_nonce")
    return iat + window


class RestartGuard:
    """Replay of a proof without a nonce across a restart of the server (protocol.md section 4).

    The jti memory lives in the serving process, and each process draws a fresh nonce secret, so a
    nonce-bearing proof from before a restart is refused after it. A proof without a nonce is acceptable
    until `iat + window` in any process. So before a process accepts one, it records in the database a
    horizon at least that late (`persist`, at most one write per `window` seconds: it records `ahead`
    seconds more than needed). The next process reads the horizon when it starts (`earlier`) and answers
    `use_dpop_nonce` to every nonce-less proof whose `iat + window` is not past it: those are the only ones
    an earlier process can have accepted. A device then uses the nonce of that answer, as it does anyway.
    """

    def __init__(self, earlier: float, persist: Callable[[float], None], ahead: float) -> None:
        self.earlier = earlier
        self._recorded = earlier
        self._persist = persist
        self._ahead = ahead

    def check(self, acceptable_until: float) -> None:
        if acceptable_until <= self.earlier:
            raise UseDPoPNonce("The server has restarted: a proof without a nonce may be a replay; "
                               "use the dpop_nonce", detail="no-nonce proof from before the server restart")

    def record(self, acceptable_until: float, now: float) -> None:
        if acceptable_until > self._recorded:
            horizon = max(acceptable_until, now + self._ahead)
            self._persist(horizon)  # before the proof is accepted: if it fails, the proof is refused
            self._recorded = horizon


class JtiMemory:
    """Seen (key, jti) pairs, each kept until the last moment its proof could still be accepted. Bounded
    twice: in all (`capacity`), and per source address, so one host flooding valid proofs from throwaway keys
    locks out only itself. Both refusals are `temporarily_unavailable` (CONNACK 5 at the broker), logged."""

    def __init__(self, capacity: int = JTI_CAPACITY, per_source: int = 5_000) -> None:
        self.capacity = capacity
        self.per_source = per_source
        self._seen: dict[tuple[str, str], tuple[float, str]] = {}  # (jkt, jti) -> (keep until, source)
        self._expiry: list[tuple[float, str, str]] = []  # heap of (keep until, jkt, jti)
        self._by_source: Counter[str] = Counter()

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, jkt, jti = heapq.heappop(self._expiry)
            _, source = self._seen.pop((jkt, jti))
            self._by_source[source] -= 1
            if self._by_source[source] <= 0:
                del self._by_source[source]

    def remember(self, jkt: str, jti: str, until: float, now: float, source: str = "") -> None:
        """Record the proof's jti, kept until `until` (the caller's acceptance deadline, at least 10 minutes)."""
        self._purge(now)
        if (jkt, jti) in self._seen:
            raise InvalidDPoPProof("The DPoP proof has been used before (jti replay)")
        if self._by_source[source] >= self.per_source:
            raise TemporarilyUnavailable("Too many DPoP proofs from this address; retry in a few minutes",
                                         detail=f"per-source proof quota of {self.per_source} reached by {source!r}")
        if len(self._seen) >= self.capacity:
            raise TemporarilyUnavailable("Too many DPoP proofs in flight; retry in a few minutes",
                                         detail=f"the DPoP jti memory is full ({self.capacity} proofs kept)")
        self._seen[(jkt, jti)] = (until, source)
        heapq.heappush(self._expiry, (until, jkt, jti))
        self._by_source[source] += 1

    def kept_until(self, jkt: str, jti: str) -> float | None:
        entry = self._seen.get((jkt, jti))
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._seen)


class DPoPVerifier:
    def __init__(self, nonces: NonceIssuer, *, algorithms: tuple[str, ...], window: int, per_source: int = 5_000,
                 restart_guard: RestartGuard | None = None) -> None:
        self.nonces = nonces
        self.algorithms = algorithms
        self.window = window
        self.jtis = JtiMemory(per_source=per_source)
        self.restart_guard = restart_guard

    def verify(self, proof: Any, *, htm: str, htu: str, now: float, access_token: str | None = None,
               source: str = "") -> Proof:
        header, claims = split_proof(proof)
        check_typ(header)
        alg = check_alg(header, self.algorithms)
        key = check_public_jwk(header, alg)
        check_signature(proof, key, alg)
        check_claim_types(claims)
        check_htm_htu(claims, htm, htu)
        check_ath(claims, access_token)
        acceptable_until = check_freshness(claims, self.nonces, now, self.window)
        if self.restart_guard is not None and "nonce" not in claims:
            self.restart_guard.check(acceptable_until)
            self.restart_guard.record(acceptable_until, now)
        jkt = jwk_thumbprint(header["jwk"])
        self.jtis.remember(jkt, claims["jti"], max(acceptable_until, now + MIN_JTI_RETENTION), now, source)
        return Proof(jkt=jkt, jti=claims["jti"], iat=float(claims["iat"]), nonce=claims.get("nonce"), claims=claims)
