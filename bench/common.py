"""What every benchmark shares: a bench data dir, servers in their own processes, paho clients driven
by one selector, DPoP proofs, percentiles, and the results file.

The broker under test always runs in a process of its own (`iotauth serve`, or stock amqtt for the
baselines), so the clients' own cost never lands in the server's figures; the server's CPU time and
resident memory are read from /proc/<pid> (Linux). Clients live in the benchmark process.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import heapq
import itertools
import json
import math
import os
import platform
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from joserfc import jws
from joserfc.jwk import ECKey
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
WHAT_IFS = ("wal-normal", "gc-freeze", "gc-off")
PREFIX = "oauth/v1"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ADMIN_PASSWORD = "bench admin password"

# Every bench client comes from 127.0.0.1, so the per-source limits meant for a flood from one address
# (broker/limits.py, authsvc/dpop.py JtiMemory) are raised for the bench data dirs. The issuer is set
# explicitly because the server listens for HTTP on a free port (the default issuer follows that port)
# and tokens minted before it starts must name the issuer it checks. Nothing else changes.
BENCH_CONFIG: dict[str, dict[str, Any]] = {
    "http": {"issuer": "http://localhost:8080"},
    "mqtt": {
        "connect_attempts_per_source": 1_000_000,
        "connect_attempt_window": 1,
        "bootstrap_sessions_per_source": 10_000,
    },
    "dpop": {"max_proofs_per_source": 200_000},
}


# -- command line and results ---------------------------------------------------------------------
def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: checks the bench runs, its figures mean nothing",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where NAME.json goes [default: bench/results]"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the iotauth server with py-spy (bench extra); summary printed and kept in NAME.json",
    )
    parser.add_argument(
        "--what-if",
        type=_what_ifs,
        default=None,
        metavar="PATCH[,PATCH]",
        help=f"run the iotauth server with proposed fixes patched in (bench/what_if.py): "
        f"{', '.join(WHAT_IFS)}",
    )
    args = parser.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    return args


def _what_ifs(text: str) -> str:
    unknown = [p for p in text.split(",") if p not in WHAT_IFS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown patch {unknown[0]!r} (known: {', '.join(WHAT_IFS)})")
    return text


def result_name(args: argparse.Namespace, name: str) -> str:
    """NAME, or NAME.what-if-PATCH for a run with a proposed fix patched in (never the evidence file)."""
    return f"{name}.what-if-{args.what_if.replace(',', '+')}" if args.what_if else name


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() or None


@dataclass
class Report:
    """Figures, targets and whether each is met; printed as a table and written to NAME.json."""

    name: str
    args: argparse.Namespace
    parameters: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    met: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def figure(self, key: str, value: Any, label: str | None = None, unit: str = "") -> Any:
        """A figure without a target; a dict of details is written to the file, and only its label printed."""
        self.figures[key] = _rounded(value)
        shown = "" if isinstance(value, (dict, list)) else _shown(value, unit)
        self._rows.append((label or key, shown, "", ""))
        return value

    def target(
        self, key: str, value: float, op: str, limit: float, label: str | None = None, unit: str = ""
    ) -> bool:
        ok = {"<=": value <= limit, ">=": value >= limit, "<": value < limit, ">": value > limit}[op]
        self.figures[key] = _rounded(value)
        self.targets[key] = f"{op} {limit:g}{(' ' + unit) if unit else ''}"
        self.met[key] = bool(ok)
        self._rows.append((label or key, _shown(value, unit), self.targets[key], "met" if ok else "MISSED"))
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text)

    def write(self) -> Path:
        wall = time.time() - self.started
        doc = {
            "name": self.name,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "amqtt": _version("amqtt"),
            "iotauth": _version("iotauth"),
            "paho-mqtt": _version("paho-mqtt"),
            "joserfc": _version("joserfc"),
            "cryptography": _version("cryptography"),
            "platform": platform.platform(),
            "git_commit": _git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "smoke": bool(self.args.smoke),
            "what_if": self.args.what_if,
            "wall_seconds": round(wall, 1),
            "parameters": self.parameters,
            "figures": self.figures,
            "targets": self.targets,
            "met": self.met,
            "notes": self.notes,
            "profiles": PROFILES,
        }
        self.args.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.args.results_dir / f"{result_name(self.args, self.name)}.json"
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        self._print(wall, path)
        return path

    def _print(self, wall: float, path: Path) -> None:
        width = max([len(r[0]) for r in self._rows] + [10])
        vwidth = max([len(r[1]) for r in self._rows] + [5])
        extra = " (smoke: sizes too small to mean anything)" if self.args.smoke else ""
        extra += f" (what if: {self.args.what_if})" if self.args.what_if else ""
        print(f"\n== {self.name}{extra} ==")
        for label, value, target, met in self._rows:
            tail = f"   target {target:<12} {met}" if target else ""
            print(f"  {label:<{width}}  {value:>{vwidth}}{tail}")
        for text in self.notes:
            print(f"  note: {text}")
        for profile in PROFILES:
            print(f"  profile of the {profile['server']} server (py-spy; all of it in the results file):")
            for line in profile["summary"][:32]:
                print(f"    {line}")
        print(f"  ({wall:.0f} s, {os.cpu_count()} CPUs; written to {_relative(path)})")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}") if abs(value) < 1e6 else round(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _shown(value: Any, unit: str) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


PROFILES: list[dict[str, Any]] = []  # py-spy summaries of the servers stopped so far (Server.stop)


# -- statistics ---------------------------------------------------------------------------------------
def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100); the p99 of fewer than 100 samples is their maximum."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- data dir and tokens --------------------------------------------------------------------------------
def _toml(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class Credentials:
    """A device as the bench holds it: its key, and an access token the service issued for that key."""

    client_id: str
    key: ECKey
    jwk: dict[str, Any]
    token: str
    exp: float


class BenchData:
    """A fresh data dir made with `iotauth init` in a temp dir, with the bench limits in its iotauth.toml."""

    def __init__(self, root: Path, config: dict[str, dict[str, Any]] | None = None) -> None:
        self.dir = root / "data"
        self.env = dict(os.environ)
        self.env.update(
            {
                "IOTAUTH_MASTER_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode(),
                "IOTAUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                "IOTAUTH_KEYRING": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name in ("IOTAUTH_ACCESS_TOKEN_TTL", "IOTAUTH_DATA_DIR"):
            self.env.pop(name, None)
        merged = {section: dict(table) for section, table in BENCH_CONFIG.items()}
        for section, table in (config or {}).items():
            merged.setdefault(section, {}).update(table)
        self.config = merged
        with self._environment():
            from authsvc.config import load_settings
            from authsvc.datadir import init_data_dir

            self.dir.mkdir(parents=True, mode=0o700)
            (self.dir / "iotauth.toml").write_text(_toml(merged))
            self.settings = load_settings(self.dir)
            init_data_dir(self.settings, force=False, now=time.time())

    @contextmanager
    def _environment(self) -> Iterator[None]:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @contextmanager
    def service(self) -> Iterator[Any]:
        """The service opened on this data dir in the bench process (as the CLI would open it)."""
        with self._environment():
            from authsvc.datadir import open_service

            svc = open_service(self.settings)
        try:
            yield svc
        finally:
            svc.store.close()

    def register(self, clients: Iterable[tuple[str, str]]) -> None:
        with self.service() as svc, svc.store.transaction():
            for client_id, scope in clients:
                svc.register_client(client_id, scope, None, time.time())

    def mint(self, clients: Iterable[tuple[str, str]], *, register: bool = True) -> list[Credentials]:
        """Register each device and give it a grant and an access token bound to a fresh key, as an approved
        pairing would (service.token_response signs the token with the active key and records it). Every
        CONNECT still verifies the token and a fresh DPoP proof in full."""
        from authsvc.dpop import jwk_thumbprint

        out = []
        with self.service() as svc, svc.store.transaction():
            for client_id, scope in clients:
                now = time.time()
                if register:
                    svc.register_client(client_id, scope, None, now)
                key = ECKey.generate_key("P-256", private=True)
                jwk = key.as_dict(private=False)
                grant = svc.store.add_grant(client_id, "admin", scope, jwk_thumbprint(jwk), now)
                token = svc.token_response(grant, scope, now, refresh_token="")["access_token"]
                out.append(Credentials(client_id, key, jwk, token, float(token_claims(token)["exp"])))
        return out


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT we issued, read without verifying (the bench only wants `exp`)."""
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


@contextmanager
def bench_data(config: dict[str, dict[str, Any]] | None = None) -> Iterator[BenchData]:
    with tempfile.TemporaryDirectory(prefix="iotauth-bench-") as tmp:
        yield BenchData(Path(tmp), config)


# -- servers in their own processes ---------------------------------------------------------------------
_PORT_LINE = re.compile(r"MQTT on [^\s:]+:(\d+)")


class Server:
    """A broker in its own process: "iotauth" runs `iotauth serve` (the product), "amqtt" runs stock amqtt
    0.12.1 (bench/plain_broker.py). `what_if` runs `iotauth serve` with one of bench/what_if.py's patches.
    `profile`: py-spy samples the server process from outside for its whole life (no code of ours runs
    in it); when it stops, a summary of where its time went joins PROFILES, which the report writes."""

    def __init__(
        self,
        kind: str,
        log_dir: Path,
        data: BenchData | None = None,
        profile: bool = False,
        what_if: str | None = None,
    ) -> None:
        self.kind = kind
        self.what_if = what_if
        self.log_path = log_dir / f"{kind}-{uuid.uuid4().hex[:6]}.log"
        env = dict(data.env) if data else dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if kind == "amqtt":
            argv = [sys.executable, "-m", "bench.plain_broker"]
        else:
            assert data is not None
            entry = ["bench.what_if", what_if] if what_if else ["authsvc"]
            argv = [
                sys.executable,
                "-m",
                *entry,
                "--data-dir",
                str(data.dir),
                "serve",
                "--mqtt-port",
                "0",
                "--http-port",
                "0",
            ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.port = self._wait_for_port(60)
        self._spy: subprocess.Popen[bytes] | None = None
        if profile:
            spy = Path(sys.executable).with_name("py-spy")
            self._folded = log_dir / f"{kind}-{uuid.uuid4().hex[:6]}.folded"
            self._spy = subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(self.proc.pid),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(self._folded),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _PORT_LINE.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not start; its log:\n{self.log_path.read_text()[-3000:]}")

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used so far: proc(5) stat fields
        14 and 15, in clock ticks."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ", field 3 is fields[0]
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        """Resident memory of the server process in bytes (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if self._spy is not None:
            try:
                self._spy.wait(30)  # py-spy writes its samples when the process it watches ends
            except subprocess.TimeoutExpired:
                self._spy.kill()
            if self._folded.exists():
                PROFILES.append(
                    {
                        "server": self.kind,
                        "what_if": self.what_if,
                        "summary": summarize_profile(self._folded).splitlines(),
                    }
                )
            self._spy = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# Frames that sit under every sample of the server (entry point, typer, asyncio's loop) say nothing.
_BOILERPLATE_FILES = {"<frozen runpy>", "__main__.py", "core.py", "main.py", "cli.py", "runners.py"}
_BOILERPLATE = {
    "BaseEventLoop.run_forever",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop._run_once",
    "Handle._run",
}


def summarize_profile(folded: Path, top: int = 45) -> str:
    """py-spy's collapsed stacks as two lists: functions by inclusive share of the samples (a function
    counted once per stack), and by self share. Shares are of the samples where the server was busy.
    py-spy reports a coroutine resumed by the loop as a stack of its own, so a caller's share can be
    lower than the sum of its callees'."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [_frame_name(f) for f in stack.split(";")]
        for name in set(names):
            inclusive[name] += n
        own[names[-1]] += n
    shown = [(name, n) for name, n in inclusive.most_common() if not _boilerplate(name)][:top]
    lines = [f"py-spy samples while busy: {total} (500 Hz); share of those samples", "", "inclusive:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {name}" for name, n in shown]
    lines += ["", "self:"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {name}" for name, n in own.most_common(20)]
    return "\n".join(lines) + "\n"


def _boilerplate(name: str) -> bool:
    function, _, where = name.partition(" (")
    return function in _BOILERPLATE or where.rstrip(")") in _BOILERPLATE_FILES


def _frame_name(frame: str) -> str:
    """ "func (path/to/module.py:123)" -> "func (module.py)": lines differ per call site, functions do not."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


# -- paho clients in one selector ---------------------------------------------------------------------
class Loop:
    """Many paho clients driven by one selector in this thread (paho's "external event loop" API), plus
    timers. One thread and no locks: a timestamp taken in a callback is not delayed by another thread."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._clients: set[mqtt.Client] = set()
        self._last_misc = time.monotonic()

    def client(
        self, client_id: str, *, username: str | None = None, password: str | None = None, keepalive: int = 60
    ) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
        if username is not None:
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_socket_open = self._opened
        c.on_socket_close = self._closed
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._done_writing
        c._bench_keepalive = keepalive  # type: ignore[attr-defined]
        return c

    def connect(self, c: mqtt.Client, port: int) -> None:
        c.connect("127.0.0.1", port, keepalive=c._bench_keepalive)  # type: ignore[attr-defined]

    def _opened(self, c: mqtt.Client, _u: Any, sock: Any) -> None:
        # paho leaves Nagle on: a request written right after the PUBACK of a reply would wait for the
        # server's delayed ACK (~40 ms), a client artefact the server figures must not carry.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, c)
        self._clients.add(c)

    def _closed(self, c: mqtt.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        self._clients.discard(c)

    def _want_write(self, c: mqtt.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def _done_writing(self, c: mqtt.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, c)

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run fn at time.perf_counter() == when (or as soon after as the loop gets to it)."""
        heapq.heappush(self._timers, (when, next(self._seq), fn))

    def step(self, timeout: float) -> None:
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.perf_counter()))
        for key, mask in self.sel.select(timeout):
            c = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and c.want_write():
                c.loop_write()
        now = time.perf_counter()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()
        mono = time.monotonic()
        if mono - self._last_misc >= 1.0:
            self._last_misc = mono
            for c in list(self._clients):
                c.loop_misc()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not done():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.step(min(left, 0.05))
        return True

    def run_for(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while (left := deadline - time.perf_counter()) > 0:
            self.step(min(left, 0.05))

    def close_all(self) -> None:
        for c in list(self._clients):
            c.disconnect()
        self.run_until(lambda: not self._clients, 10)
        self.sel.close()


def connack_code(reason: Any) -> int:
    """paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back to 3.1.1."""
    value = reason.value if hasattr(reason, "value") else int(reason)
    return {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}.get(value, value)


# -- DPoP proofs, as a device makes them (protocol.md section 4) -------------------------------------------
def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_proof(
    key: ECKey, jwk: dict[str, Any], htm: str, htu: str, *, nonce: str | None = None, token: str | None = None
) -> str:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}
    claims: dict[str, Any] = {"jti": uuid.uuid4().hex, "iat": int(time.time()), "htm": htm, "htu": htu}
    if nonce is not None:
        claims["nonce"] = nonce
    if token is not None:
        claims["ath"] = b64u(hashlib.sha256(token.encode()).digest())
    return jws.serialize_compact(header, json.dumps(claims).encode(), key, algorithms=["ES256"])


def connect_password(cred: Credentials, audience: str) -> str:
    """protocol.md section 6: the access token, one space, a fresh CONNECT proof."""
    return f"{cred.token} {make_proof(cred.key, cred.jwk, 'CONNECT', audience, token=cred.token)}"


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, username: str, password: str, keepalive: int = 60) -> bytes:
    """A raw MQTT 3.1.1 CONNECT with clean session, username and password (section 3.1)."""
    variable = b"\x00\x04MQTT\x04\xc2" + struct.pack("!H", keepalive)
    payload = _mqtt_string(client_id) + _mqtt_string(username) + _mqtt_string(password)
    return b"\x10" + remaining_length(len(variable) + len(payload)) + variable + payload


DISCONNECT = b"\xe0\x00"


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
