"""Property tests (issue 4, "Fuzzing"): the MQTT request handlers and the topic-filter logic.

Request handlers: every request topic is driven through `MqttApi.on_request` (the real entry point with
parsing, the size limit and rendering) on a real service and data dir, with any bytes, any JSON value,
well-formed envelopes whose fields take any JSON value, and near-valid requests built from real values
(a registered client, real device codes and tokens, real DPoP proofs) with one thing changed. Whatever
comes in, `on_request` returns within a bounded time, and either drops the request (protocol.md
section 3: not JSON, not an object, bad `reply_to`, over 16 KiB, retained), publishing nothing, or
publishes exactly one strict-JSON object to `reply_to`: a success body or an error with a protocol code.
Afterwards the service still carries a device through a whole pairing.

Topic filters: `topic_matches`, `filter_within` and `filters_overlap` against a regex reading of MQTT
3.1.1 section 4.7, exhaustively over a small universe and at random beyond it.

`make test` runs the short budget; the long one carries the `soak` marker (`make test-all`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, assume, event, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from authsvc import metrics
from authsvc.grants import DEVICE_CODE_GRANT, GRANTS, REFRESH_GRANT
from authsvc.mqtt_api import MqttApi
from authsvc.service import ENDPOINTS
from broker.acl import filter_within, filters_overlap, topic_matches
from tests.test_acl import MATCHING
from tests.wire import b64u

# --------------------------------------------------------------------------- budgets

HANG_SECONDS = 10  # a request still running after this is a hang: the watchdog interrupts it
_BASE = hsettings(deadline=3000, suppress_health_check=list(HealthCheck), print_blob=True)
SHORT = {"cheap": hsettings(_BASE, max_examples=100), "request": hsettings(_BASE, max_examples=120),
         "matcher": hsettings(_BASE, max_examples=400)}
LONG = {"cheap": hsettings(_BASE, max_examples=3000), "request": hsettings(_BASE, max_examples=2000),
        "matcher": hsettings(_BASE, max_examples=20_000)}
BUDGETS = [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.soak)]


# --------------------------------------------------------------------------- the protocol's side of things

MAX_REQUEST = 16 * 1024  # protocol.md section 3
REPLY_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
ERROR_CODES = frozenset({
    # RFC 6749 section 5.2
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type",
    "invalid_scope",
    # RFC 8628 section 3.5
    "authorization_pending", "slow_down", "access_denied", "expired_token",
    # RFC 9449
    "invalid_dpop_proof", "use_dpop_nonce",
    # RFC 6749 section 4.1.2.1: load shedding (pending-code cap, proof quota, busy database). Not
    # server_error: that one means an exception escaped the core, which is what this module hunts.
    "temporarily_unavailable",
})  # fmt: skip
SUCCESS_FIELDS = {
    "device_authorization": {"device_code", "user_code", "verification_uri", "verification_uri_complete",
                             "expires_in", "interval"},
    "token": {"access_token", "token_type", "expires_in", "scope", "refresh_token"},
    "revoke": set(),
}


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (RFC 8259 has no NaN or Infinity)")


def strict_json(text: bytes | str) -> Any:
    """RFC 8259 JSON only: Python's json also reads NaN, Infinity and -Infinity, which are not JSON."""
    return json.loads(text, parse_constant=not_json)


def answerable(payload: bytes, retain: bool, prefix: str) -> dict[str, Any] | None:
    """The request body when protocol.md section 3 says the request must be answered, else None (dropped)."""
    if retain or len(payload) > MAX_REQUEST:
        return None
    try:
        body = strict_json(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond what any parser takes
        # Also a number of more than 4300 digits, which Python's json will not convert: the service drops
        # such a request as unreadable, a limit protocol.md does not name (see the last sample of any_bytes).
        return None
    if not isinstance(body, dict):
        return None
    reply_to = body.get("reply_to")
    if not isinstance(reply_to, str) or not reply_to.startswith(f"{prefix}/reply/"):
        return None
    reply_id = reply_to[len(f"{prefix}/reply/"):]
    return body if 22 <= len(reply_id) <= 64 and set(reply_id) <= REPLY_ID_CHARS else None


def dropped(endpoint: str) -> float:
    return metrics.REGISTRY.get_sample_value("iotauth_requests_dropped_total", {"endpoint": endpoint}) or 0.0


def tally(outcome: str) -> None:
    """Count outcomes for --hypothesis-show-statistics (how deep the examples reach)."""
    if currently_in_test_context():
        event(outcome)


class Hang(BaseException):  # not an Exception: the adapter's catch-all must not turn it into a reply
    pass


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Interrupt a request that runs away (hypothesis' deadline only judges requests that finish)."""
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"request still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Wire:
    """The real MqttApi on the real service; `publish` records what would go out through the broker."""

    def __init__(self, service: Any, clock: Any) -> None:
        self.service = service
        self.clock = clock
        self.prefix = service.settings.prefix
        self.published: list[tuple[str, bytes]] = []
        self.api = MqttApi(service, clock, self._publish)
        self.loop = asyncio.new_event_loop()
        self.sent = 0
        assert set(self.api.request_topics.values()) == set(ENDPOINTS)
        assert service.settings.max_request_size == MAX_REQUEST

    async def _publish(self, topic: str, data: bytes) -> None:
        self.published.append((topic, data))

    def close(self) -> None:
        self.loop.close()

    def send(self, endpoint: str, payload: bytes, retain: bool = False) -> dict[str, Any] | None:
        """One request through `on_request`, checked against the protocol; the reply, or None if dropped."""
        expected = answerable(payload, retain, self.prefix)
        self.published = []
        self.sent += 1
        drops = dropped(endpoint)
        with watchdog(HANG_SECONDS):
            self.loop.run_until_complete(self.api.on_request(f"{self.prefix}/{endpoint}", payload, retain,
                                                             f"10.0.0.{self.sent // 1000}"))
        if expected is None:
            tally("dropped")
            assert self.published == [], "a request that cannot be answered got a reply"
            assert dropped(endpoint) == drops + 1, "a dropped request was not counted"
            return None
        assert dropped(endpoint) == drops, "a request with a usable reply_to was dropped"
        assert len(self.published) == 1, f"{len(self.published)} replies to one request"
        topic, data = self.published[0]
        assert topic == expected["reply_to"]
        reply = strict_json(data.decode("utf-8"))
        tally(f"reply: {reply.get('error', 'success') if isinstance(reply, dict) else 'not an object'}")
        check_reply(endpoint, expected, reply, self.service.current_nonce(self.clock.now()))
        return reply

    def request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return self.send(endpoint, json.dumps(body).encode())


def check_reply(endpoint: str, body: dict[str, Any], reply: Any, nonce: str) -> None:
    assert isinstance(reply, dict), reply
    assert reply.get("dpop_nonce") == nonce, "every reply carries the current nonce"
    if "correlation_id" in body:
        assert "correlation_id" in reply and reply["correlation_id"] == body["correlation_id"]
    else:
        assert "correlation_id" not in reply
    fields = set(reply) - {"dpop_nonce", "correlation_id"}
    if "error" in reply:
        assert reply["error"] in ERROR_CODES, f"{reply['error']!r} is not a protocol error code: {reply}"
        assert fields == {"error", "error_description"} and isinstance(reply["error_description"], str), reply
        return
    assert fields == SUCCESS_FIELDS[endpoint], reply
    if endpoint == "device_authorization":
        assert re.fullmatch(r"[A-Za-z0-9]{64}", reply["device_code"]), reply
        assert re.fullmatch(r"[A-Z]{3}[0-9]{3}", reply["user_code"]), reply
        assert reply["expires_in"] == 600 and reply["interval"] == 5
    elif endpoint == "token":
        assert reply["token_type"] == "DPoP" and isinstance(reply["access_token"], str), reply
        assert isinstance(reply["refresh_token"], str) and len(reply["refresh_token"]) >= 43, reply


# --------------------------------------------------------------------------- a device, its key and its proofs


class DeviceKey:
    """An ES256 key that signs any header and claims, well-formed or not (joserfc would refuse some)."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        numbers = self.private.public_key().public_numbers()
        self.jwk = {"kty": "EC", "crv": "P-256", "x": b64u(numbers.x.to_bytes(32, "big")),
                    "y": b64u(numbers.y.to_bytes(32, "big"))}

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        signing_input = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class ProofSpec:
    """A DPoP proof before it is signed, so a mutation can reach any part of it."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signer: DeviceKey

    def render(self) -> str:
        return self.signer.sign(self.header, self.claims)


def proof_spec(key: DeviceKey, htu: str, now: float, nonce: str | None = None) -> ProofSpec:
    claims: dict[str, Any] = {"jti": uuid.uuid4().hex, "iat": int(now), "htm": "PUBLISH", "htu": htu}
    if nonce is not None:
        claims["nonce"] = nonce
    return ProofSpec({"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(key.jwk)}, claims, key)


def reply_to() -> str:
    return f"oauth/v1/reply/{uuid.uuid4().hex}"


def register_fresh_client(wire: Wire) -> str:
    client_id = f"fuzz-{uuid.uuid4().hex[:12]}"
    wire.service.register_client(client_id, "device:power", None, wire.clock.now())
    return client_id


class World:
    """Real values to start from, kept real as the fuzzing uses them up: a registered client and its key,
    device codes in each state, a live grant, and another device's tokens and codes to swap in."""

    def __init__(self, wire: Wire, client_id: str = "lamp-1", other_id: str = "thermo-1") -> None:
        self.wire = wire
        self.svc = wire.service
        self.key = DeviceKey()
        self.other_key = DeviceKey()
        self.client_id = client_id
        self.fresh_client: str | None = None
        self.codes: dict[str, str] = {}  # "pending", "denied" -> a live code of this client in that state
        self.old_codes: list[str] = []  # expired, consumed, or another client's
        self.tokens: dict[str, Any] | None = None
        self.spent: list[str] = []  # refresh tokens of this grant already rotated away
        self.jtis: list[str] = []
        self.other = self.pair(other_id, self.other_key)
        self.old_codes.append(self.authorize(other_id, self.other_key)["device_code"])

    def now(self) -> float:
        return float(self.wire.clock.now())

    def new_proof(self, endpoint: str, key: DeviceKey | None = None) -> ProofSpec:
        spec = proof_spec(key or self.key, f"{self.wire.prefix}/{endpoint}", self.now())
        self.jtis = [*self.jtis[-4:], spec.claims["jti"]]
        return spec

    def proof(self, endpoint: str, key: DeviceKey | None = None) -> str:
        return self.new_proof(endpoint, key).render()

    def register_fresh_client(self) -> str:
        self.fresh_client = register_fresh_client(self.wire)
        return self.fresh_client

    def authorize(self, client_id: str, key: DeviceKey | None = None) -> dict[str, Any]:
        reply = self.wire.request("device_authorization", {"reply_to": reply_to(), "client_id": client_id,
                                                           "dpop": self.proof("device_authorization", key)})
        assert reply is not None and "device_code" in reply, reply
        return reply

    def decided(self, approve: bool = True, client_id: str | None = None,
                key: DeviceKey | None = None) -> str:
        auth = self.authorize(client_id or self.client_id, key)
        self.svc.decide(auth["user_code"], "admin", approve, self.now())
        return str(auth["device_code"])

    def pair(self, client_id: str, key: DeviceKey) -> dict[str, Any]:
        code = self.decided(True, client_id, key)
        reply = self.wire.request("token", {"reply_to": reply_to(), "client_id": client_id,
                                            "dpop": self.proof("token", key),
                                            "grant_type": DEVICE_CODE_GRANT, "device_code": code})
        assert reply is not None and "access_token" in reply, reply
        self.old_codes.append(code)  # consumed now
        return reply

    def code(self, state: str) -> str:
        """A device code of this client, pending or denied; a new one once the last has expired."""
        code = self.codes.get(state)
        row = self.svc.store.device_code(self.svc.hash_device_code(code)) if code else None
        if code is None or row is None or row.expires <= self.now():
            if code is not None:
                self.old_codes = [*self.old_codes[-4:], code]
            code = self.codes[state] = (self.authorize(self.client_id)["device_code"] if state == "pending"
                                        else self.decided(approve=False))
        return code

    def live_tokens(self) -> dict[str, Any]:
        """The current grant's tokens; pairs again when the fuzzing revoked or used them up."""
        if self.tokens is not None:
            row = self.svc.store.refresh_token(self.svc.hash_refresh(self.tokens["refresh_token"]))
            grant = self.svc.store.grant(row.grant_id) if row else None
            if row is not None and row.used is None and grant is not None and grant.revoked is None:
                return self.tokens
            self.spent = []
        self.tokens = self.pair(self.client_id, self.key)
        return self.tokens

    def saw(self, reply: dict[str, Any] | None) -> None:
        if reply is not None and "refresh_token" in reply and self.tokens is not None:
            if self.tokens["refresh_token"] != reply["refresh_token"]:
                self.spent = [*self.spent[-4:], self.tokens["refresh_token"]]
            self.tokens = reply

    def device_authorization_client(self) -> str:
        """A client with room for more pending codes (20 at most per client)."""
        client = self.fresh_client
        if client is None or self.svc.store.pending_device_codes(client, self.now()) >= 15:
            return self.register_fresh_client()
        return self.fresh_client

    def alternatives(self, target: str) -> list[Any]:
        """Other real values for one part of a request: what a confused or hostile device might send."""
        now, step, prefix = self.now(), self.svc.settings.nonce_step, self.wire.prefix
        mine, other = self.tokens or {}, self.other
        values: dict[str, list[Any]] = {
            "body.client_id": ["thermo-1", "panel-1", self.fresh_client, "fridge-9"],
            "body.device_code": [*self.codes.values(), *self.old_codes],
            "body.refresh_token": [*self.spent, mine.get("access_token"), other["refresh_token"]],
            "body.token": [*self.spent, mine.get("access_token"), mine.get("refresh_token"),
                           other["refresh_token"], other["access_token"]],
            "body.scope": ["device:power", "write:temperature", "device:power device:power", "", " "],
            "body.grant_type": [DEVICE_CODE_GRANT, REFRESH_GRANT,
                                "urn:ietf:params:oauth:grant-type:jwt-bearer"],
            "body.token_type_hint": ["refresh_token", "access_token", "id_token"],
            "claims.jti": self.jtis,
            "claims.nonce": [self.svc.current_nonce(now - k * step) for k in (0, 1, 2)],
            "claims.iat": [now + d for d in (-3600, -61, -59, 59, 61, 3600)] + [str(int(now)), now + 0.5],
            "claims.htu": [f"{prefix}/{e}" for e in ENDPOINTS]
            + ["mqtt://localhost:1883", f"{prefix}/token/"],
            "claims.htm": ["CONNECT", "POST", "publish"],
            "header.typ": ["jwt", "at+jwt", "DPOP+JWT"],
            "header.alg": ["EdDSA", "ES384", "RS256", "none", "HS256"],
            "header.jwk": [self.other_key.jwk, {**self.key.jwk, "d": self.key.jwk["x"]}],
            "jwk.crv": ["P-384", "Ed25519"],
            "jwk.kty": ["OKP", "RSA", "oct"],
            "jwk.x": [self.other_key.jwk["x"], self.key.jwk["y"]],
            "jwk.y": [self.other_key.jwk["y"], self.key.jwk["x"]],
        }
        return [v for v in values.get(target, []) if v is not None]


def assert_still_serves(wire: Wire) -> None:
    """After the fuzzing, a new device pairs, refreshes and revokes as if nothing had happened."""
    world = World(wire, register_fresh_client(wire), register_fresh_client(wire))
    tokens = world.pair(world.client_id, world.key)
    refreshed = wire.request("token", {"reply_to": reply_to(), "client_id": world.client_id,
                                       "grant_type": REFRESH_GRANT, "refresh_token": tokens["refresh_token"],
                                       "dpop": world.proof("token"), "correlation_id": "after"})
    assert refreshed is not None and "access_token" in refreshed and refreshed["correlation_id"] == "after"
    revoked = wire.request("revoke", {"reply_to": reply_to(), "client_id": world.client_id,
                                      "token": refreshed["refresh_token"], "dpop": world.proof("revoke")})
    assert revoked is not None and set(revoked) == {"dpop_nonce"}, revoked


@pytest.fixture
def wire(svc: Any, clock: Any) -> Iterator[Wire]:
    w = Wire(svc, clock)
    yield w
    w.close()


# --------------------------------------------------------------------------- strategies: values

SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc00\ud800", "a\udbff"])
# strings the service gives meaning to, so that random bodies sometimes reach deep into the handlers
PLAUSIBLE = st.sampled_from([
    "lamp-1", "thermo-1", "fridge-9", "", " ", "x/y", "+", "#", "lamp-1\x00", "l\u00e4mp",
    DEVICE_CODE_GRANT, REFRESH_GRANT, "password", "device:power", "device:power read:temperature",
    "refresh_token", "access_token", "A" * 64, "a.b.c", "e30.e30.", "oauth/v1/reply/" + "A" * 22,
])  # fmt: skip
texts = st.one_of(
    st.text(max_size=30),
    PLAUSIBLE,
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), SURROGATES, st.text(max_size=4)),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),  # far beyond 64 bits and float range
    st.sampled_from([2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**309, -0]),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity are not JSON: such a request drops
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a device might send it: escaped ASCII, or raw UTF-8 (lone surrogates: invalid bytes)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- strategies: whole requests

good_reply_ids = st.text(alphabet=sorted(REPLY_ID_CHARS), min_size=22, max_size=64)
reply_tos = st.one_of(
    good_reply_ids.map(lambda r: f"oauth/v1/reply/{r}"),
    good_reply_ids.map(lambda r: f"oauth/v1/reply/{r}"),
    st.sampled_from([21, 65, 200]).map(lambda n: "oauth/v1/reply/" + "A" * n),
    good_reply_ids.flatmap(lambda r: st.sampled_from([
        f"oauth/v1/reply/{r}/x", f"oauth/v1/reply/{r}+", f"oauth/v1/reply/{r}#", f"oauth/v2/reply/{r}",
        f"/oauth/v1/reply/{r}", f"oauth/v1/reply/{r[:-1]}\u00e9", f"oauth/v1/reply/{r[:-1]}\ud800",
        f"oauth/v1/reply/{r}\n", "oauth/v1/token", "oauth/v1/reply/"])),
    json_values,
)
FIELDS = ("client_id", "scope", "grant_type", "device_code", "refresh_token", "token", "token_type_hint",
          "dpop")
# values that take a request past its first checks, so random envelopes reach every handler's later steps
LIKELY = {"client_id": ["lamp-1", "thermo-1", "panel-1"], "grant_type": [DEVICE_CODE_GRANT, REFRESH_GRANT],
          "scope": ["device:power", "write:temperature"],
          "token_type_hint": ["refresh_token", "access_token"]}


def field_value(name: str) -> st.SearchStrategy[Any]:
    likely = LIKELY.get(name)
    return st.one_of(st.sampled_from(likely), st.sampled_from(likely), PLAUSIBLE, json_values) if likely \
        else st.one_of(PLAUSIBLE, json_values)


def tenths(n: int) -> st.SearchStrategy[bool]:
    """True n times in 10 (hypothesis' integers lean towards their bounds, a flat sample does not)."""
    return st.sampled_from([True] * n + [False] * (10 - n))


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A JSON object with a reply_to (usually valid), maybe a correlation_id, and any request fields."""
    body: dict[str, Any] = {}
    if draw(tenths(9)):
        body["reply_to"] = draw(good_reply_ids.map(lambda r: f"oauth/v1/reply/{r}") if draw(tenths(8))
                                else reply_tos)
    if draw(st.booleans()):
        body["correlation_id"] = draw(st.one_of(st.text(max_size=64), st.text(min_size=65, max_size=70),
                                                json_values))
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS))):
        body[name] = draw(field_value(name))
    if draw(tenths(3)):
        body.update(draw(st.dictionaries(texts, json_values, max_size=2)))
    order = draw(st.permutations(list(body)))
    body = {k: body[k] for k in order}
    payload = encode(body, draw(tenths(9)))
    pad = draw(st.sampled_from([None] * 8 + [MAX_REQUEST, MAX_REQUEST + 1]))
    if pad is not None and len(payload) + 12 <= pad:
        body["pad"] = ""
        body["pad"] = "x" * (pad - len(encode(body, True)))
        payload = encode(body, True)
    return payload, draw(st.sampled_from([False] * 19 + [True]))


@st.composite
def mangled_json(draw: st.DrawFn) -> bytes:
    """A valid envelope, then damaged as bytes: truncated, a byte changed, inserted or deleted."""
    payload = bytearray(json.dumps({"reply_to": "oauth/v1/reply/" + "A" * 22, "client_id": "lamp-1",
                                    "n": draw(numbers)}).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(payload)))
        action = draw(st.sampled_from(["cut", "set", "insert", "delete"]))
        if action == "cut":
            del payload[at:]
        elif action == "insert":
            payload[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif at < len(payload):
            if action == "set":
                payload[at] = draw(st.integers(0, 255))
            else:
                del payload[at]
    return bytes(payload)


any_bytes = st.one_of(
    st.binary(max_size=200),
    mangled_json(),
    st.sampled_from([
        b"", b"{}", b"null", b"[]", b"\xef\xbb\xbf{}",
        b'{"reply_to": "oauth/v1/reply/' + b"A" * 22 + b'"}\x00',
        b'{"reply_to": "oauth/v1/reply/' + b"A" * 22 + b'", "x": 1' + b"0" * 5000 + b"}",  # 5001 digits
        b'{"reply_to": "oauth/v1/reply/' + b"A" * 22 + b'", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"reply_to": "oauth/v1/reply/' + b"A" * 22 + b'", "client_id": "lamp-1", "n": -Infinity}',
    ]),
)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_any_bytes_are_dropped_or_answered_by_the_protocol(wire: Wire, endpoint: str, budget: Any) -> None:
    @budget["cheap"]
    @given(payload=any_bytes, retain=st.booleans())
    def check(payload: bytes, retain: bool) -> None:
        wire.send(endpoint, payload, retain)

    check()
    assert_still_serves(wire)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_any_json_value_is_dropped_or_answered_by_the_protocol(wire: Wire, endpoint: str,
                                                                budget: Any) -> None:
    @budget["cheap"]
    @given(value=json_values, ascii_only=st.booleans())
    def check(value: Any, ascii_only: bool) -> None:
        wire.send(endpoint, encode(value, ascii_only))

    check()
    assert_still_serves(wire)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_envelopes_with_any_field_values_get_a_protocol_reply(wire: Wire, endpoint: str, budget: Any) -> None:
    @budget["request"]
    @given(request=envelopes())
    def check(request: tuple[bytes, bool]) -> None:
        wire.send(endpoint, *request)

    check()
    assert_still_serves(wire)


# --------------------------------------------------------------------------- near-valid requests


@dataclass
class Request:
    endpoint: str
    body: dict[str, Any]
    proof: ProofSpec | None
    retain: bool = False
    pad_to: int | None = None

    def payload(self) -> bytes:
        body = dict(self.body)
        if self.proof is not None:
            body["dpop"] = self.proof.render()
        raw = json.dumps(body).encode()
        if self.pad_to is not None and len(raw) + 12 <= self.pad_to:
            body["pad"] = ""
            body["pad"] = "x" * (self.pad_to - len(json.dumps(body).encode()))
            raw = json.dumps(body).encode()
        return raw


def envelope(world: World, endpoint: str, **fields: Any) -> Request:
    return Request(endpoint, {"reply_to": reply_to(), **fields}, world.new_proof(endpoint))


def device_authorization_request(world: World, draw: st.DrawFn) -> Request:
    request = envelope(world, "device_authorization", client_id=world.device_authorization_client())
    if draw(st.booleans()):
        request.body["scope"] = "device:power"
    if draw(st.booleans()):
        request.proof = None  # the proof is optional here
    return request


def device_code_request(world: World, draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(["pending", "approved", "denied"]))
    code = world.decided() if kind == "approved" else world.code(kind)
    return envelope(world, "token", grant_type=DEVICE_CODE_GRANT, device_code=code, client_id=world.client_id)


def refresh_request(world: World, draw: st.DrawFn) -> Request:
    request = envelope(world, "token", grant_type=REFRESH_GRANT,
                       refresh_token=world.live_tokens()["refresh_token"], client_id=world.client_id)
    if draw(st.booleans()):
        request.body["scope"] = "device:power"
    return request


def revoke_request(world: World, draw: st.DrawFn) -> Request:
    which = draw(st.sampled_from(["refresh_token", "access_token"]))
    request = envelope(world, "revoke", token=world.live_tokens()[which], client_id=world.client_id)
    if draw(st.booleans()):
        request.body["token_type_hint"] = which
    return request


SCENARIOS: dict[str, tuple[str, Callable[[World, st.DrawFn], Request]]] = {
    "device_authorization": ("device_authorization", device_authorization_request),
    "token-device_code": ("token", device_code_request),
    "token-refresh_token": ("token", refresh_request),
    "revoke": ("revoke", revoke_request),
}
GRANT_OF_SCENARIO = {"token-device_code": DEVICE_CODE_GRANT, "token-refresh_token": REFRESH_GRANT}


def test_every_handler_and_grant_type_has_a_near_valid_scenario() -> None:
    assert {endpoint for endpoint, _ in SCENARIOS.values()} == set(ENDPOINTS)
    assert set(GRANT_OF_SCENARIO.values()) == set(GRANTS)


def near_strings(real: str) -> st.SearchStrategy[str]:
    return st.sampled_from([
        "", real[:-1], real + "x", real.upper(), real.swapcase(), real + "\ud800", " " + real, real * 2,
        real[:1], real.replace("-", "+"), real + "/#", real[::-1],
    ])  # fmt: skip


def pick(values: list[Any]) -> st.SearchStrategy[Any]:
    """One of `values`, a list whose length depends on the world's state: drawn as an index of fixed range,
    so that replaying an example against a changed world draws the same way (no FlakyStrategyDefinition)."""
    return st.integers(0, 2**16).map(lambda i: values[i % len(values)] if values else None)


def replacement(real: Any, alternatives: list[Any], reals: list[Any]) -> st.SearchStrategy[Any]:
    """A value to put where `real` was: another real value of its kind, a near miss of it, a real value of
    another kind, or anything at all."""
    near = near_strings(real) if isinstance(real, str) else pick(alternatives)
    return st.one_of(pick(alternatives), pick(alternatives), pick(alternatives), near, near, pick(reals),
                     json_values)


def mutate(world: World, request: Request, draw: st.DrawFn) -> str:
    """Change one thing of a valid request; returns what was changed (for the failure report)."""
    body, proof = request.body, request.proof
    reals = [v for v in body.values()] + [world.client_id, "thermo-1", *world.old_codes, *world.spent]
    areas = {"body": [f"body.{name}" for name in body if name != "reply_to"],
             "envelope": ["body.reply_to", "retain", "size"]}
    areas["body"] += ["body.correlation_id", "body.<new>"]
    if proof is not None:
        areas["proof"] = [f"header.{name}" for name in proof.header]
        areas["proof"] += [f"claims.{name}" for name in proof.claims]
        areas["proof"] += [f"jwk.{name}" for name in proof.header["jwk"]]
        areas["proof"] += ["jwk.d", "claims.nonce", "claims.ath", "header.<new>", "signer", "dpop.text",
                           "dpop.drop"]
    elif request.endpoint != "token":
        areas["body"].append("dpop.add")
    # the request's own fields half the time, its proof most of the rest, the envelope now and then
    area = draw(st.sampled_from(["body"] * 5 + ["proof" if proof is not None else "body"] * 4 + ["envelope"]))
    target = draw(st.sampled_from(areas[area]))
    where, _, name = target.partition(".")
    if target == "retain":
        request.retain = True
    elif target == "size":
        request.pad_to = draw(st.sampled_from([MAX_REQUEST, MAX_REQUEST + 1]))
    elif target == "signer":
        assert proof is not None
        proof.signer = world.other_key  # signed by a key that is not the one in the header
        if draw(st.booleans()):
            proof.header["jwk"] = dict(world.other_key.jwk)  # a valid proof, by another device's key
    elif target == "dpop.drop":
        request.proof = None
    elif target == "dpop.add":
        request.proof = world.new_proof(request.endpoint)
    elif target == "dpop.text":
        assert proof is not None
        text = proof.render()
        request.proof = None
        oversized = proof.signer.sign(proof.header, {**proof.claims, "pad": "x" * 4096})  # signed, > 4 KiB
        body["dpop"] = draw(near_strings(text) | st.sampled_from([text.replace(".", "..", 1), text + ".x",
                                                                   text.rsplit(".", 1)[0] + ".", oversized]))
    else:
        container = {"body": body, "header": proof.header if proof else {},
                     "claims": proof.claims if proof else {},
                     "jwk": proof.header.get("jwk", {}) if proof else {}}[where]
        if not isinstance(container, dict):
            return target  # a mutation already replaced the jwk by a non-object
        if name == "<new>":
            name = draw(texts)
        if draw(tenths(2)) and name in container:
            del container[name]
        else:
            container[name] = draw(replacement(container.get(name), world.alternatives(target), reals))
    return target


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("budget", BUDGETS)
def test_near_valid_requests_get_a_protocol_reply(wire: Wire, scenario: str, budget: Any) -> None:
    world = World(wire)
    endpoint, build = SCENARIOS[scenario]

    @budget["request"]
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        if data.draw(tenths(1)):  # time passes: codes expire, nonces step on, the refresh grace period ends
            wire.clock.advance(data.draw(st.sampled_from([31, 301, 601])))
        request = build(world, data.draw)
        changed = mutate(world, request, data.draw) if data.draw(tenths(9)) else "nothing"
        note(f"changed: {changed}")
        world.saw(wire.send(endpoint, request.payload(), request.retain))

    check()
    assert_still_serves(wire)


def test_a_proof_whose_nonce_is_a_lone_surrogate_gets_a_protocol_error(wire: Wire) -> None:
    world = World(wire)
    proof = proof_spec(world.key, "oauth/v1/device_authorization", world.now(), nonce="\ud800")
    reply = wire.request("device_authorization", {"reply_to": reply_to(), "client_id": "lamp-1",
                                                  "dpop": proof.render()})
    assert reply is not None and reply["error"] == "use_dpop_nonce"


# --------------------------------------------------------------------------- topic filters: the reference


def mqtt_string(text: str) -> bool:
    """MQTT 1.5.3: UTF-8, at most 65535 bytes, no NUL."""
    try:
        return len(text.encode("utf-8")) <= 65535 and "\x00" not in text
    except UnicodeEncodeError:
        return False


def reference_matches(topic_filter: str, topic: str) -> bool:
    """An independent regex reading of MQTT 4.7 (and 1.5.3), the oracle for the three functions."""
    if not mqtt_string(topic) or not mqtt_string(topic_filter):
        return False
    if not topic or re.search(r"[+#]", topic):
        return False
    if not topic_filter or re.search(r"[^/]\+|\+[^/]|[^/]#|#.", topic_filter):
        return False
    levels = topic_filter.split("/")
    words = [r"[^/]*" if level == "+" else re.escape(level) for level in levels if level != "#"]
    if levels[-1] == "#":
        pattern = "/".join(words) + r"(?:/.*)?" if words else ".*"
    else:
        pattern = "/".join(words)
    if levels[0] in ("+", "#"):
        pattern = r"(?!\$)" + pattern
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


FRESH, FRESH_DOLLAR = "\u2603", "$\u2603"  # levels no generated filter contains


def witnesses(*filters: str) -> list[str]:
    """Topics enough to decide how the filters' match sets relate: at each level, every literal one of the
    filters has there, plus a fresh level (and a fresh '$' level first); one level more than the longest.
    Any topic can be mapped onto one of these without changing which of the filters match it: a level no
    filter names there acts like the fresh one, and levels past the longest filter's only feed a '#'."""
    split = [f.split("/") for f in filters]
    depth = max(len(s) for s in split) + 1
    choices = []
    for index in range(depth):
        literals = {s[index] for s in split if index < len(s) and s[index] not in ("+", "#")} | {FRESH}
        choices.append(sorted(literals | {FRESH_DOLLAR} if index == 0 else literals))
    return ["/".join(levels) for size in range(1, depth + 1) for levels in itertools.product(*choices[:size])]


def reference_within(requested: str, granted: str, universe: list[str]) -> bool:
    """Every topic `requested` matches, `granted` matches (and `requested` is a filter that matches any)."""
    matched = [t for t in universe if reference_matches(requested, t)]
    return bool(matched) and all(reference_matches(granted, t) for t in matched)


def reference_overlap(a: str, b: str, universe: list[str]) -> bool:
    return any(reference_matches(a, t) and reference_matches(b, t) for t in universe)


def test_reference_matcher_agrees_with_the_cases_table() -> None:
    assert [reference_matches(f, t) for f, t, _ in MATCHING] == [expected for _, _, expected in MATCHING]


LEVELS = st.one_of(
    st.sampled_from(["a", "b", "", "$", "$a", "+", "#", "sport", "a+", "#a", "$SYS", "\x00", "\u00e9"]),
    st.text(alphabet="ab$+#/\x00\u00e9\ud800", max_size=4),
)
TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$", "$a", "c", "sport", "\u00e9", "a\x00", "\ud800"])


def joined(levels: st.SearchStrategy[str], max_levels: int) -> st.SearchStrategy[str]:
    return st.lists(levels, min_size=1, max_size=max_levels).map("/".join)


FEW_LEVELS = st.sampled_from(["a", "b", "", "$", "$a", "+", "#"])  # dense: most pairs of filters interact
FILTERS = st.one_of(joined(FEW_LEVELS, 5), joined(LEVELS, 5), st.text(alphabet="ab$/+#", max_size=10))
TOPICS = st.one_of(joined(FEW_LEVELS.filter(lambda level: level not in "+#"), 6), joined(TOPIC_LEVELS, 6),
                   st.text(alphabet="ab$/+#", max_size=10))


@st.composite
def related_filters(draw: st.DrawFn) -> tuple[str, str]:
    """Two filters that differ in a level or two, or where one is cut short by '#' or runs longer: the pairs
    where within and overlap are decided by a single rule (wildcards, '$', the parent level of '#')."""
    levels = draw(st.lists(st.one_of(FEW_LEVELS, FEW_LEVELS, FEW_LEVELS, LEVELS), min_size=1, max_size=4))
    other = [draw(st.sampled_from([level, level, "+", "#", "a", "$a", ""])) for level in levels]
    ending = draw(st.sampled_from(["same", "cut", "shorter", "longer"]))
    if ending == "cut":
        other = other[:draw(st.integers(0, len(other)))] + ["#"]
    elif ending == "shorter" and len(other) > 1:
        other = other[:draw(st.integers(1, len(other) - 1))]
    elif ending == "longer":
        other += draw(st.lists(FEW_LEVELS, min_size=1, max_size=2))
    first, second = "/".join(levels), "/".join(other)
    return (first, second) if draw(st.booleans()) else (second, first)


LONG_TOPICS = st.sampled_from(["x" * 65535, "x" * 65536, "a/" + "x" * 65533, "\u00e9" * 32768, "+/" * 32768])


@pytest.mark.parametrize("budget", BUDGETS)
def test_topic_matches_agrees_with_the_reference(budget: Any) -> None:
    @budget["matcher"]
    @given(FILTERS | LONG_TOPICS, TOPICS | LONG_TOPICS)
    def check(topic_filter: str, topic: str) -> None:
        assert topic_matches(topic_filter, topic) is reference_matches(topic_filter, topic)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_filter_within_and_filters_overlap_agree_with_the_reference(budget: Any) -> None:
    @budget["matcher"]
    @given(st.one_of(st.tuples(FILTERS, FILTERS), related_filters()))
    def check(pair: tuple[str, str]) -> None:
        a, b = pair
        universe = witnesses(a, b)
        assert filter_within(a, b) is reference_within(a, b, universe)
        assert filters_overlap(a, b) is reference_overlap(a, b, universe)

    check()


def test_filter_within_and_filters_overlap_are_exact_over_a_small_universe() -> None:
    """Every pair of filters of up to 3 levels over a, '', $a, + and #, against every topic that can tell."""
    filters = sorted({"/".join(p) for n in range(1, 4) for p in itertools.product(["a", "", "$a", "+", "#"],
                                                                                    repeat=n)})
    universe = witnesses(*filters)
    matched = {f: frozenset(t for t in universe if reference_matches(f, t)) for f in filters}
    assert [(f, t) for f in filters for t in universe if topic_matches(f, t) is not (t in matched[f])] == []
    wrong = [(a, b) for a, b in itertools.product(filters, repeat=2)
             if filter_within(a, b) is not (bool(matched[a]) and matched[a] <= matched[b])
             or filters_overlap(a, b) is not bool(matched[a] & matched[b])]
    assert len(filters) == 155 and len(universe) == 185
    assert wrong == []
