"""`iotauth serve` with one proposed fix patched in, to measure a proposal before anyone makes it.

Usage: python -m bench.what_if PATCH[,PATCH] [iotauth arguments...]; the benchmarks take `--what-if`.
Nothing here is used by the product; each patch is the smallest faithful version of a fix proposed in
docs/performance.md for a file the bench does not own.

- poll-in-memory: a device code's polling state (last poll, interval) kept in the serving process instead
  of written to SQLite on every poll (authsvc/store.py record_poll; only `serve` ever polls).
- wal-normal: SQLite `synchronous = NORMAL` (WAL mode: no fsync per commit; a power cut may lose the
  last commits, never consistency).
- direct-topic-check: HardenedBroker asks its plugin directly for topic checks instead of through amqtt's
  PluginManager, which wraps every check in new tasks and a gather (broker/server.py).
- gc-freeze: once the server has started, `gc.collect(); gc.freeze()` (authsvc/runtime.py), so the
  collector's full passes no longer walk the ~80,000 objects of the imported modules every time.
- lean-jose: each JWT of a CONNECT (token and proof) is parsed once and its ES256 signature checked with
  `cryptography` directly, and proof keys are built from their point (cached by thumbprint) instead of
  through joserfc's key import (authsvc/dpop.py, authsvc/tokens.py). Every check stays as it is.
- gc-off: a diagnostic, not a fix: the garbage collector disabled once the server has started (cyclic
  garbage is then never freed), to show how much of a latency tail its passes make.
- lazy-dummy-hash: the argon2 hash that authsvc/accounts.py computes at import (for constant-time login
  of unknown accounts) is made on first use, so one-shot commands such as `iotauth revoke` skip it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any


def poll_in_memory() -> None:
    from authsvc.store import Store

    polls: dict[str, tuple[float, int]] = {}
    stored = Store.device_code

    def device_code(self: Store, code_hash: str) -> Any:
        code = stored(self, code_hash)
        if code is not None and code_hash in polls:
            last_poll, interval = polls[code_hash]
            code = dataclasses.replace(code, last_poll=last_poll, interval=interval)
        return code

    def record_poll(self: Store, code_hash: str, now: float, interval: int) -> None:
        polls[code_hash] = (now, interval)

    Store.device_code = device_code  # type: ignore[method-assign]
    Store.record_poll = record_poll  # type: ignore[method-assign]


def wal_normal() -> None:
    from authsvc.store import Store

    opened = Store.open.__func__  # type: ignore[attr-defined]

    def open_(cls: type[Store], path: Any, *, create: bool = False) -> Store:
        store = opened(cls, path, create=create)
        store.conn.execute("PRAGMA synchronous = NORMAL")
        return store

    Store.open = classmethod(open_)  # type: ignore[method-assign, assignment]


def direct_topic_check() -> None:
    from broker.plugin import IotAuthPlugin
    from broker.server import HardenedBroker

    async def _topic_filtering(self: HardenedBroker, session: Any, topic: str, action: Any) -> bool:
        plugin = self.__dict__.get("_iotauth_plugin")
        if plugin is None:
            plugin = self.__dict__["_iotauth_plugin"] = self.plugins_manager.get_plugin("IotAuthPlugin")
        assert isinstance(plugin, IotAuthPlugin)
        return await plugin.topic_filtering(session=session, topic=topic, action=action)

    HardenedBroker._topic_filtering = _topic_filtering  # type: ignore[method-assign]


def gc_freeze() -> None:
    import contextlib
    import gc

    import authsvc.runtime

    running = authsvc.runtime.running

    @contextlib.asynccontextmanager
    async def frozen(*args: Any, **kwargs: Any) -> Any:
        async with running(*args, **kwargs) as run:
            gc.collect()
            gc.freeze()
            yield run

    authsvc.runtime.running = frozen  # type: ignore[assignment]


def gc_off() -> None:
    import contextlib
    import gc

    import authsvc.runtime

    running = authsvc.runtime.running

    @contextlib.asynccontextmanager
    async def collector_off(*args: Any, **kwargs: Any) -> Any:
        async with running(*args, **kwargs) as run:
            gc.disable()
            yield run

    authsvc.runtime.running = collector_off  # type: ignore[assignment]


def lean_jose() -> None:
    from collections import OrderedDict

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    import authsvc.dpop
    import authsvc.service
    import authsvc.tokens
    from authsvc.dpop import PRIVATE_JWK_MEMBERS, InvalidDPoPProof
    from authsvc.keys import SIGNING_ALG, b64u_decode
    from authsvc.tokens import TokenError, check_claims, check_header

    ecdsa = ec.ECDSA(hashes.SHA256())

    def es256_ok(jwt: str, public_key: Any) -> bool:
        signing_input, _, sig = jwt.rpartition(".")
        try:
            raw = b64u_decode(sig)
            if len(raw) != 64:
                return False
            der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            public_key.verify(der, signing_input.encode("ascii"), ecdsa)
        except (InvalidSignature, ValueError, UnicodeEncodeError):
            return False
        return True

    stock_jwk = authsvc.dpop.check_public_jwk
    proof_keys: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def check_public_jwk(header: dict[str, Any], alg: str) -> Any:
        jwk = header.get("jwk")
        if (
            alg != "ES256"
            or not isinstance(jwk, dict)
            or PRIVATE_JWK_MEMBERS & jwk.keys()
            or jwk.get("kty") != "EC"
            or jwk.get("crv") != "P-256"
            or not isinstance(jwk.get("x"), str)
            or not isinstance(jwk.get("y"), str)
        ):
            return stock_jwk(header, alg)  # every refusal in its own words, as before
        cache_key = (jwk["x"], jwk["y"])
        key = proof_keys.get(cache_key)
        if key is None:
            try:
                x, y = b64u_decode(jwk["x"]), b64u_decode(jwk["y"])
                if len(x) != 32 or len(y) != 32:
                    raise ValueError("coordinates of the wrong length")
                key = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), b"\x04" + x + y
                )  # on-curve check
            except ValueError:
                raise InvalidDPoPProof("The DPoP proof jwk is not a valid public key") from None
            proof_keys[cache_key] = key
            if len(proof_keys) > 10_000:
                proof_keys.popitem(last=False)
        return key

    def check_signature(proof: str, key: Any, alg: str) -> None:
        if alg != "ES256" or not isinstance(key, ec.EllipticCurvePublicKey) or not es256_ok(proof, key):
            raise InvalidDPoPProof("The DPoP proof signature does not verify")

    token_keys: dict[str, Any] = {}

    def verify_access_token(
        token: Any, signing_keys: dict[str, Any], *, issuer: str, audience: str, now: float
    ) -> Any:
        header, claims = authsvc.tokens._parts(token)  # parsed once
        key = check_header(header, signing_keys)  # typ, alg = ES256, no crit, kid among ours
        public = token_keys.get(key.kid)
        if public is None:
            public = token_keys[key.kid] = key.key.raw_value.public_key()
        if header.get("alg") != SIGNING_ALG or not es256_ok(token, public):
            raise TokenError("signature does not verify")
        return check_claims(claims, issuer=issuer, audience=audience, now=now)

    authsvc.dpop.check_public_jwk = check_public_jwk  # type: ignore[assignment]
    authsvc.dpop.check_signature = check_signature  # type: ignore[assignment]
    authsvc.tokens.verify_access_token = verify_access_token  # type: ignore[assignment]
    authsvc.service.verify_access_token = verify_access_token  # type: ignore[assignment]


def lazy_dummy_hash() -> None:
    import argon2

    hash_at_import = argon2.PasswordHasher.hash
    argon2.PasswordHasher.hash = lambda self, password, **kw: "made on first use"  # type: ignore[method-assign]
    import authsvc.accounts  # noqa: F401 - imported now, with the hash stubbed for its module-level dummy

    argon2.PasswordHasher.hash = hash_at_import  # type: ignore[method-assign]


APPLY = {
    "poll-in-memory": poll_in_memory,
    "wal-normal": wal_normal,
    "direct-topic-check": direct_topic_check,
    "gc-freeze": gc_freeze,
    "gc-off": gc_off,
    "lean-jose": lean_jose,
    "lazy-dummy-hash": lazy_dummy_hash,
}


def apply(patches: str) -> None:
    """One patch, or several separated by commas."""
    for patch in patches.split(","):
        APPLY[patch]()


def main() -> None:
    apply(sys.argv.pop(1))
    from authsvc.cli import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
