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
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from joserfc.jwk import ECKey, OKPKey

from authsvc.errors import InvalidDPoPProof, TemporarilyUnavailable, UseDPoPNonce
from authsvc.jws_compact import CompactJWS, b64u_decode_strict
from authsvc.keys import b64u

MAX_PROOF_BYTES = 4096
MAX_JTI_CHARS = 64  # protocol.md section 4; bounds what one entry of the jti memory can cost
MIN_JTI_RETENTION = 600  # protocol.md section 4: the jti memory keeps each entry at least 10 minutes
PER_TRUSTED_KEY = 1_000  # live proofs a paired device's key may hold beyond the quotas (a device makes a few)
JTI_CAPACITY = 200_000  # entries in all (a few hundred bytes each); when full, new proofs are refused
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# algorithm -> (kty, crv) its key must have; asymmetric only
KEY_TYPES = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}
PROOF_KEY_CACHE = 4096  # proof keys kept built, by their coordinates: a device reconnects with the same key
COORDINATE_BYTES = 32  # P-256 x and y, Ed25519 x (RFC 7518 6.2.1.2: the full size, leading zeros kept)


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
def _parse(proof: Any) -> CompactJWS:
    if not isinstance(proof, str) or not proof:
        raise InvalidDPoPProof("The DPoP proof must be a JWT string")
    if len(proof) > MAX_PROOF_BYTES:
        raise InvalidDPoPProof(f"The DPoP proof exceeds {MAX_PROOF_BYTES} bytes")
    if proof.count(".") != 2:
        raise InvalidDPoPProof("The DPoP proof is not a compact JWS")
    try:
        parsed = CompactJWS(proof)  # decoded once; the signature check reuses it
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested JSON
        raise InvalidDPoPProof("The DPoP proof is not well-formed") from None
    if not isinstance(parsed.header, dict) or not isinstance(parsed.claims, dict):
        raise InvalidDPoPProof("The DPoP proof is not well-formed")
    return parsed


def split_proof(proof: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    parsed = _parse(proof)
    return parsed.header, parsed.claims


def check_typ(header: dict[str, Any]) -> None:
    if header.get("typ") != "dpop+jwt":
        raise InvalidDPoPProof("The DPoP proof must have typ dpop+jwt")


def check_alg(header: dict[str, Any], allowed: tuple[str, ...]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed or alg not in KEY_TYPES:
        raise InvalidDPoPProof(f"The DPoP proof algorithm must be one of {', '.join(allowed)}")
    return alg


@dataclass(frozen=True, slots=True)
class ProofKey:
    """The proof's public key (a `cryptography` key), and whether its jwk lets it verify a signature of the
    proof's alg: a jwk whose `use` is not sig, whose `alg` is another, or whose `key_ops` lack verify is
    a valid key, refused at the signature check (RFC 7517 4.2-4.4; as joserfc did)."""

    public: ec.EllipticCurvePublicKey | Ed25519PublicKey
    may_verify: bool


# JWK members joserfc validated when it imported a proof key (RFC 7517 section 4, RFC 7518 6.2.1):
# a jwk failing one of these is "not a valid public key"
_JWK_USES = ("sig", "enc")
_JWK_KEY_OPS = ("sign", "verify", "encrypt", "decrypt", "wrapKey", "unwrapKey", "deriveKey", "deriveBits")
_JWK_OPS_OF_USE = {"sig": ("sign", "verify"),
                   "enc": ("encrypt", "decrypt", "wrapKey", "unwrapKey", "deriveKey", "deriveBits")}


def _one_of(value: Any, choices: tuple[str, ...]) -> bool:
    return all(v in choices for v in value) if isinstance(value, list) else value in choices


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


_JWK_MEMBERS: dict[str, Callable[[Any], bool]] = {
    "use": lambda value: _one_of(value, _JWK_USES),
    "key_ops": lambda value: _one_of(value, _JWK_KEY_OPS),
    "alg": lambda value: isinstance(value, str),
    "kid": lambda value: isinstance(value, str),
    "x5u": _is_url,
    "x5c": lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value),
    "x5t": lambda value: isinstance(value, str),
    "x5t#S256": lambda value: isinstance(value, str),
}


def _jwk_members_valid(jwk: dict[str, Any], kty: str) -> bool:
    coordinates = ("x", "y") if kty == "EC" else ("x",)
    if not all(isinstance(jwk.get(name), str) for name in coordinates):
        return False
    if not all(valid(jwk[name]) for name, valid in _JWK_MEMBERS.items() if name in jwk):
        return False
    if "use" in jwk and "key_ops" in jwk:  # both: every operation must belong to the use
        use = jwk["use"]
        if not isinstance(use, str):
            return False
        return all(op in _JWK_OPS_OF_USE[use] for op in jwk["key_ops"])
    return True


def _may_verify(get: Callable[[str], Any], alg: str) -> bool:
    """joserfc's check_use("sig"), check_alg(alg) and check_key_op("verify") on the jwk's members."""
    use, key_alg, key_ops = get("use"), get("alg"), get("key_ops")
    return not (use and use != "sig") and not (key_alg and key_alg != alg) and (key_ops is None or
                                                                              "verify" in key_ops)


class _ProofKeyCache:
    """Public keys built from proof jwks, by (kty, x, y): least recently used first out. Only valid keys are
    kept, and a key is a pure function of its coordinates, so a hit needs no check a miss would make."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[str, ...], ec.EllipticCurvePublicKey | Ed25519PublicKey] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, coordinates: tuple[str, ...]) -> ec.EllipticCurvePublicKey | Ed25519PublicKey | None:
        with self._lock:
            key = self._keys.get(coordinates)
            if key is not None:
                self._keys.move_to_end(coordinates)
            return key

    def put(self, coordinates: tuple[str, ...], key: ec.EllipticCurvePublicKey | Ed25519PublicKey) -> None:
        with self._lock:
            self._keys[coordinates] = key
            self._keys.move_to_end(coordinates)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)


_proof_keys = _ProofKeyCache(PROOF_KEY_CACHE)


def _coordinate(text: str) -> bytes:
    raw = b64u_decode_strict(text)
    if len(raw) != COORDINATE_BYTES:
        raise ValueError(f"a coordinate of {len(raw)} bytes")
    return raw


def _public_key(jwk: dict[str, Any], kty: str) -> ec.EllipticCurvePublicKey | Ed25519PublicKey:
    """ValueError unless x (and y) are strict base64url of exactly 32 bytes and make a valid key: a P-256
    point on the curve (`public_key()` checks it), or an Ed25519 public key."""
    coordinates = (kty, jwk["x"], jwk["y"]) if kty == "EC" else (kty, jwk["x"])
    key = _proof_keys.get(coordinates)
    if key is None:
        if kty == "EC":
            x, y = _coordinate(jwk["x"]), _coordinate(jwk["y"])
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                ec.SECP256R1()).public_key()
        else:
            key = Ed25519PublicKey.from_public_bytes(_coordinate(jwk["x"]))
        _proof_keys.put(coordinates, key)
    return key


def check_public_jwk(header: dict[str, Any], alg: str) -> ProofKey:
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidDPoPProof("The DPoP proof header must carry a jwk")
    if PRIVATE_JWK_MEMBERS & jwk.keys():
        raise InvalidDPoPProof("The DPoP proof jwk must not contain private key members")
    kty, crv = KEY_TYPES[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        raise InvalidDPoPProof(f"The DPoP proof jwk must be a {kty} {crv} key for {alg}")
    if not _jwk_members_valid(jwk, kty):
        raise InvalidDPoPProof("The DPoP proof jwk is not a valid public key")
    try:
        public = _public_key(jwk, kty)
    except ValueError:
        raise InvalidDPoPProof("The DPoP proof jwk is not a valid public key") from None
    return ProofKey(public, _may_verify(jwk.get, alg))


def _verify_signature(parsed: CompactJWS | None, key: Any, alg: str) -> None:
    if isinstance(key, ProofKey):
        public, may_verify = key.public, key.may_verify
    elif isinstance(key, (ECKey, OKPKey)):  # as callers outside `DPoPVerifier.verify` may pass
        public, may_verify = key.public_key, _may_verify(key.get, alg)
    else:  # a bare `cryptography` public key
        public, may_verify = key, True
    if parsed is None or not may_verify or not parsed.verifies(public, alg):
        raise InvalidDPoPProof("The DPoP proof signature does not verify")


def check_signature(proof: str, key: ProofKey | ECKey | OKPKey, alg: str) -> None:
    """The signature check on its own (`DPoPVerifier.verify` reuses the proof it has already decoded)."""
    parsed: CompactJWS | None = None
    if isinstance(proof, str):
        try:
            parsed = CompactJWS(proof, json_payload=False)
        except (ValueError, RecursionError):
            pass
    if parsed is not None and not isinstance(parsed.header, dict):
        parsed = None
    _verify_signature(parsed, key, alg)


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

    def __init__(self, capacity: int = JTI_CAPACITY, per_source: int = 5_000,
                 trusted: Callable[[str], bool] | None = None) -> None:
        self.capacity = capacity
        self.per_source = per_source
        # A key bound to a live grant (a paired device's) is never locked out by a flood of throwaway keys,
        # from however many addresses: past either bound its proofs are kept under a quota of their own.
        self.trusted = trusted
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
        if self._by_source[source] >= self.per_source or len(self._seen) >= self.capacity:
            source = self._reserve_for(jkt, source)
        self._seen[(jkt, jti)] = (until, source)
        heapq.heappush(self._expiry, (until, jkt, jti))
        self._by_source[source] += 1

    def _reserve_for(self, jkt: str, source: str) -> str:
        """The accounting name for a proof past the per-source quota or the capacity, or a refusal."""
        reserved = f"key:{jkt}"
        if self.trusted is not None and self._by_source[reserved] < PER_TRUSTED_KEY and self.trusted(jkt):
            return reserved
        if self._by_source[source] >= self.per_source:
            raise TemporarilyUnavailable("Too many DPoP proofs from this address; retry in a few minutes",
                                         detail=f"per-source proof quota of {self.per_source} reached by {source!r}")
        raise TemporarilyUnavailable("Too many DPoP proofs in flight; retry in a few minutes",
                                     detail=f"the DPoP jti memory is full ({self.capacity} proofs kept)")

    def kept_until(self, jkt: str, jti: str) -> float | None:
        entry = self._seen.get((jkt, jti))
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._seen)


class DPoPVerifier:
    def __init__(self, nonces: NonceIssuer, *, algorithms: tuple[str, ...], window: int, per_source: int = 5_000,
                 restart_guard: RestartGuard | None = None, trusted: Callable[[str], bool] | None = None) -> None:
        self.nonces = nonces
        self.algorithms = algorithms
        self.window = window
        self.jtis = JtiMemory(per_source=per_source, trusted=trusted)
        self.restart_guard = restart_guard

    def verify(self, proof: Any, *, htm: str, htu: str, now: float, access_token: str | None = None,
               source: str = "") -> Proof:
        parsed = _parse(proof)  # each part decoded once, for the checks and the signature alike
        header, claims = parsed.header, parsed.claims
        check_typ(header)
        alg = check_alg(header, self.algorithms)
        key = check_public_jwk(header, alg)
        _verify_signature(parsed, key, alg)
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
