"""Configuration: the shipped defaults, `<data dir>/iotauth.toml` and env overrides.

Validated once, at load; every error names the file, the key and the problem,
e.g. `~/.local/share/iotauth/iotauth.toml: tokens.access_ttl = 3600 exceeds the 900 s maximum`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from broker.acl import ACLConfigError, ScopeRule, parse_scope_catalogue

MAX_ACCESS_TTL = 900
ALLOWED_PROOF_ALGS = ("ES256", "EdDSA")  # asymmetric only: none and HS* can never be configured
OVERRIDE_FILE = "iotauth.toml"
DEFAULT_DATA_DIR = Path("~/.local/share/iotauth").expanduser()


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message is one line for the user."""


def default_data_dir() -> Path:
    env = os.environ.get("IOTAUTH_DATA_DIR")
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    issuer_override: str | None = None
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    audience: str = "mqtt://localhost:1883"
    prefix: str = "oauth/v1"
    max_packet_size: int = 65536
    max_request_size: int = 16384
    connect_timeout: float = 10.0
    connect_attempts_per_source: int = 20
    connect_attempt_window: float = 10.0
    bootstrap_sessions_per_source: int = 50
    access_ttl: int = 900
    refresh_ttl: int = 180 * 86400
    refresh_grace: int = 30
    refresh_absolute_days: int = 0  # a grant cannot be refreshed this many days after its approval; 0: no limit
    device_code_ttl: int = 600
    poll_interval: int = 5
    dpop_algorithms: tuple[str, ...] = ("ES256",)
    iat_window: int = 60
    nonce_step: int = 300
    max_proofs_per_source: int = 5000
    max_failures: int = 5
    failure_window: int = 60
    scopes: dict[str, ScopeRule] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return self.issuer_override or f"http://localhost:{self.http_port}"

    @property
    def verification_uri(self) -> str:
        return self.issuer + "/activate"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "iotauth.db"

    def with_ports(self, *, mqtt_port: int | None = None, http_port: int | None = None) -> Settings:
        changes: dict[str, Any] = {}
        if mqtt_port is not None:
            changes["mqtt_port"] = mqtt_port
        if http_port is not None:
            changes["http_port"] = http_port
        return replace(self, **changes)


# (section, key) -> (Settings field, type, check) ; check returns an error text or None
def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _not_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "is not a TCP port (0-65535)"


def _access_ttl(v: Any) -> str | None:
    if v <= 0:
        return "must be greater than 0"
    return f"exceeds the {MAX_ACCESS_TTL} s maximum" if v > MAX_ACCESS_TTL else None


def _algs(v: Any) -> str | None:
    if not v or not all(isinstance(a, str) for a in v):
        return "must be a non-empty list of algorithm names"
    bad = [a for a in v if a not in ALLOWED_PROOF_ALGS]
    return f"{bad[0]!r} is not allowed (allowed: {', '.join(ALLOWED_PROOF_ALGS)})" if bad else None


def _nonempty(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def _prefix(v: Any) -> str | None:
    if not v or v.startswith("$") or "" in v.split("/") or any(c in v for c in "+#\0"):
        return "must be a plain topic prefix without wildcards, empty levels or a leading '$', e.g. 'oauth/v1'"
    return None


def _packet_size(v: Any) -> str | None:
    # at least room for a CONNECT carrying a token and its proof; at most MQTT's own limit
    return None if 4096 <= v <= 268_435_455 else "must be between 4096 and 268435455 bytes"


_KEYS: dict[tuple[str, str], tuple[str, type | tuple[type, ...], Any]] = {
    ("http", "host"): ("http_host", str, _nonempty),
    ("http", "port"): ("http_port", int, _port),
    ("http", "issuer"): ("issuer_override", str, _nonempty),
    ("mqtt", "host"): ("mqtt_host", str, _nonempty),
    ("mqtt", "port"): ("mqtt_port", int, _port),
    ("mqtt", "audience"): ("audience", str, _nonempty),
    ("mqtt", "topic_prefix"): ("prefix", str, _prefix),
    ("mqtt", "max_packet_size"): ("max_packet_size", int, _packet_size),
    ("mqtt", "max_request_size"): ("max_request_size", int, _packet_size),
    ("mqtt", "connect_timeout"): ("connect_timeout", (int, float), _positive),
    ("mqtt", "connect_attempts_per_source"): ("connect_attempts_per_source", int, _positive),
    ("mqtt", "connect_attempt_window"): ("connect_attempt_window", (int, float), _positive),
    ("mqtt", "bootstrap_sessions_per_source"): ("bootstrap_sessions_per_source", int, _positive),
    ("tokens", "access_ttl"): ("access_ttl", int, _access_ttl),
    ("tokens", "refresh_ttl_days"): ("refresh_ttl", int, _positive),
    ("tokens", "refresh_grace"): ("refresh_grace", int, lambda v: None if v >= 0 else "must not be negative"),
    ("tokens", "refresh_absolute_days"): ("refresh_absolute_days", int, _not_negative),
    ("tokens", "device_code_ttl"): ("device_code_ttl", int, _positive),
    ("tokens", "poll_interval"): ("poll_interval", int, _positive),
    ("dpop", "algorithms"): ("dpop_algorithms", list, _algs),
    ("dpop", "iat_window"): ("iat_window", int, _positive),
    ("dpop", "nonce_step"): ("nonce_step", int, _positive),
    ("dpop", "max_proofs_per_source"): ("max_proofs_per_source", int, _positive),
    ("activate", "max_failures"): ("max_failures", int, _positive),
    ("activate", "failure_window"): ("failure_window", int, _positive),
}
_CONVERT = {"refresh_ttl": lambda d: d * 86400, "dpop_algorithms": tuple, "connect_timeout": float,
            "connect_attempt_window": float}


def shipped_defaults_text() -> str:
    packaged = resources.files("authsvc").joinpath("default.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # editable install / source checkout: the file lives in config/ at the top of the repository
    return (Path(__file__).resolve().parent.parent / "config" / "default.toml").read_text(encoding="utf-8")


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def _apply(values: dict[str, Any], doc: dict[str, Any], source: str) -> None:
    for section, table in doc.items():
        if section == "scopes":
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a table")
        for key, value in table.items():
            spec = _KEYS.get((section, key))
            if spec is None:
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            name, typ, check = spec
            if isinstance(value, bool) or not isinstance(value, typ):
                raise ConfigError(f"{source}: {section}.{key} = {value!r} has the wrong type")
            problem = check(value)
            if problem:
                raise ConfigError(f"{source}: {section}.{key} = {value!r} {problem}")
            values[name] = _CONVERT.get(name, lambda v: v)(value)


def _env_overrides(values: dict[str, Any]) -> None:
    raw = os.environ.get("IOTAUTH_ACCESS_TOKEN_TTL")
    if raw is None:
        return
    try:
        ttl = int(raw)
    except ValueError:
        raise ConfigError(f"IOTAUTH_ACCESS_TOKEN_TTL = {raw!r} is not a whole number of seconds") from None
    problem = _access_ttl(ttl)
    if problem:
        raise ConfigError(f"IOTAUTH_ACCESS_TOKEN_TTL = {ttl} {problem}")
    values["access_ttl"] = ttl


def load_settings(data_dir: Path | None = None) -> Settings:
    data_dir = (data_dir or default_data_dir()).expanduser()
    values: dict[str, Any] = {}
    defaults = _read_toml(shipped_defaults_text(), "config/default.toml")
    _apply(values, defaults, "config/default.toml")
    scopes_raw: dict[str, Any] = dict(defaults.get("scopes", {}))
    override = data_dir / OVERRIDE_FILE
    if override.exists() and not override.is_file():
        raise ConfigError(f"{override}: not a file")
    if override.is_file():
        try:
            text = override.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{override}: cannot be read: {exc}") from None
        doc = _read_toml(text, str(override))
        _apply(values, doc, str(override))
        if "scopes" in doc:
            if not isinstance(doc["scopes"], dict):
                raise ConfigError(f"{override}: scopes must be a table of scope tables")
            scopes_raw.update(doc["scopes"])
        source = str(override)
    else:
        source = "config/default.toml"
    _env_overrides(values)
    try:
        scopes = parse_scope_catalogue(scopes_raw, source, prefix=values.get("prefix", "oauth/v1"))
    except (ACLConfigError, ValueError) as exc:
        raise ConfigError(str(exc) if isinstance(exc, ACLConfigError) else f"{source}: {exc}") from None
    settings = Settings(data_dir=data_dir, scopes=scopes, **values)
    if settings.max_request_size > settings.max_packet_size:
        raise ConfigError(f"{source}: mqtt.max_request_size = {settings.max_request_size} exceeds "
                          f"mqtt.max_packet_size = {settings.max_packet_size}")
    return settings
