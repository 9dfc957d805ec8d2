"""Configuration and data dir: every bad input is one line naming the file (or variable) and the key.

`load_settings` reads the shipped defaults, `<data dir>/iotauth.toml` and the environment, validated once.
Opening a data dir with a corrupt database or the wrong master key is a clear DataDirError, never a crash.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from authsvc.cli import app
from authsvc.config import ConfigError, load_settings
from authsvc.datadir import DataDirError, open_service

runner = CliRunner()
from tests.conftest import ENV


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def config_error(data_dir: Path, text: str) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "iotauth.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(data_dir)
    message = str(exc.value)
    assert "\n" not in message
    return message


SCOPE = '[scopes."read:humidity"]\ndescription = "Read humidity"\nsubscribe = []\n'

# (case id, iotauth.toml text, the message after "<file>: ")
BAD_FILES: list[Any] = [
    ("unknown key", "[tokens]\nacces_ttl = 600\n", "unknown key tokens.acces_ttl"),
    ("unknown section", "[token]\naccess_ttl = 600\n", "unknown key token.access_ttl"),
    ("a section that is a value", "tokens = 600\n", "tokens must be a table"),
    ("access_ttl a string", '[tokens]\naccess_ttl = "600"\n', "tokens.access_ttl = '600' has the wrong type"),
    ("access_ttl a boolean", "[tokens]\naccess_ttl = true\n", "tokens.access_ttl = True has the wrong type"),
    ("access_ttl a float", "[tokens]\naccess_ttl = 600.0\n", "tokens.access_ttl = 600.0 has the wrong type"),
    ("access_ttl 3600", "[tokens]\naccess_ttl = 3600\n",
     "tokens.access_ttl = 3600 exceeds the 900 s maximum"),
    ("access_ttl 901", "[tokens]\naccess_ttl = 901\n", "tokens.access_ttl = 901 exceeds the 900 s maximum"),
    ("access_ttl 0", "[tokens]\naccess_ttl = 0\n", "tokens.access_ttl = 0 must be greater than 0"),
    ("refresh_grace negative", "[tokens]\nrefresh_grace = -1\n",
     "tokens.refresh_grace = -1 must not be negative"),
    ("port out of range", "[mqtt]\nport = 70000\n", "mqtt.port = 70000 is not a TCP port (0-65535)"),
    ("bad TOML", "[tokens\naccess_ttl = 600\n", "not valid TOML: "),
    ("bad TOML value", "[tokens]\naccess_ttl = 6 00\n", "not valid TOML: "),
    ("dpop algorithm HS256", '[dpop]\nalgorithms = ["HS256"]\n',
     "dpop.algorithms = ['HS256'] 'HS256' is not allowed (allowed: ES256, EdDSA)"),
    ("dpop algorithm none", '[dpop]\nalgorithms = ["ES256", "none"]\n',
     "dpop.algorithms = ['ES256', 'none'] 'none' is not allowed (allowed: ES256, EdDSA)"),
    ("dpop algorithm RS256", '[dpop]\nalgorithms = ["RS256"]\n',
     "dpop.algorithms = ['RS256'] 'RS256' is not allowed (allowed: ES256, EdDSA)"),
    ("dpop algorithms empty", "[dpop]\nalgorithms = []\n",
     "dpop.algorithms = [] must be a non-empty list of algorithm names"),
    ("dpop algorithms a string", '[dpop]\nalgorithms = "ES256"\n',
     "dpop.algorithms = 'ES256' has the wrong type"),
    ("topic prefix with a wildcard", '[mqtt]\ntopic_prefix = "oauth/#"\n',
     "mqtt.topic_prefix = 'oauth/#' must be"),
    ("scope template with a partial-level wildcard", SCOPE + 'publish = ["home/+x"]\n',
     "scopes.\"read:humidity\".publish[0] = 'home/+x'"),
    ("scope template with a partial-level placeholder", SCOPE + 'publish = ["home/x{client_id}"]\n',
     "scopes.\"read:humidity\".publish[0] = 'home/x{client_id}'"),
    ("scope template under the protocol prefix", SCOPE + 'publish = ["oauth/v1/token"]\n',
     "scopes.\"read:humidity\".publish[0] = 'oauth/v1/token'"),
    ("scope template reaching the prefix by wildcard", SCOPE + 'publish = ["#"]\n',
     "scopes.\"read:humidity\".publish[0] = '#'"),
    ("scope with an unknown key", SCOPE + "publish = []\npublsh = []\n",
     "scopes.\"read:humidity\".publsh is not a known key"),
    ("scope without publish", SCOPE, "scopes.\"read:humidity\".publish is missing"),
    ("topic prefix with an empty level", '[mqtt]\ntopic_prefix = "oauth//v1"\n',
     "mqtt.topic_prefix = 'oauth//v1' must be a plain topic prefix without wildcards, empty levels"),
    ("topic prefix with a leading slash", '[mqtt]\ntopic_prefix = "/oauth"\n', "mqtt.topic_prefix = '/oauth' must"),
    ("packet size too small for a CONNECT", "[mqtt]\nmax_packet_size = 10\n",
     "mqtt.max_packet_size = 10 must be between 4096 and 268435455 bytes"),
    ("request limit above the packet limit", "[mqtt]\nmax_request_size = 70000\n",
     "mqtt.max_request_size = 70000 exceeds mqtt.max_packet_size = 65536"),
]


@pytest.mark.parametrize("text, message", [pytest.param(t, m, id=i) for i, t, m in BAD_FILES])
def test_bad_file_is_one_line_naming_the_file_and_key(tmp_path, text, message):
    data = tmp_path / "data"
    assert config_error(data, text).startswith(f"{data / 'iotauth.toml'}: {message}")


@pytest.mark.parametrize("value, message", [
    pytest.param("901", "IOTAUTH_ACCESS_TOKEN_TTL = 901 exceeds the 900 s maximum", id="901"),
    pytest.param("3600", "IOTAUTH_ACCESS_TOKEN_TTL = 3600 exceeds the 900 s maximum", id="3600"),
    pytest.param("abc", "IOTAUTH_ACCESS_TOKEN_TTL = 'abc' is not a whole number of seconds", id="abc"),
    pytest.param("600.5", "IOTAUTH_ACCESS_TOKEN_TTL = '600.5' is not a whole number of seconds", id="600.5"),
    pytest.param("0", "IOTAUTH_ACCESS_TOKEN_TTL = 0 must be greater than 0", id="0"),
])
def test_bad_access_ttl_from_the_environment_is_one_line_naming_the_variable(tmp_path, monkeypatch, value,
                                                                             message):
    monkeypatch.setenv("IOTAUTH_ACCESS_TOKEN_TTL", value)
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path / "data")
    assert str(exc.value) == message


def test_access_ttl_from_the_environment_overrides_the_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "iotauth.toml").write_text("[tokens]\naccess_ttl = 300\n")
    assert load_settings(data).access_ttl == 300
    monkeypatch.setenv("IOTAUTH_ACCESS_TOKEN_TTL", "600")
    assert load_settings(data).access_ttl == 600


def test_defaults_without_an_override_file(tmp_path):
    s = load_settings(tmp_path / "data")
    assert (s.access_ttl, s.refresh_ttl, s.refresh_grace, s.device_code_ttl, s.poll_interval) == \
        (900, 180 * 86400, 30, 600, 5)
    assert (s.dpop_algorithms, s.iat_window, s.nonce_step) == (("ES256",), 60, 300)
    assert (s.audience, s.prefix, s.max_request_size) == ("mqtt://localhost:1883", "oauth/v1", 16384)
    assert s.issuer == "http://localhost:8080"
    assert set(s.scopes) == {"read:temperature", "write:temperature", "control:power", "device:power"}


OVERRIDE = """
[http]
issuer = "https://auth.home.arpa"
[mqtt]
audience = "mqtt://broker.home.arpa:8883"
[tokens]
access_ttl = 600
refresh_ttl_days = 30
refresh_grace = 10
device_code_ttl = 300
poll_interval = 7
[dpop]
algorithms = ["ES256", "EdDSA"]
iat_window = 30
[scopes."read:humidity"]
description = "Read the humidity of every room"
subscribe = ["home/+/humidity"]
publish = []
"""


def test_override_file_values_take_effect(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "iotauth.toml").write_text(OVERRIDE)
    s = load_settings(data)
    assert (s.issuer, s.verification_uri) == ("https://auth.home.arpa", "https://auth.home.arpa/activate")
    assert s.audience == "mqtt://broker.home.arpa:8883"
    assert (s.access_ttl, s.refresh_ttl, s.refresh_grace, s.device_code_ttl, s.poll_interval) == \
        (600, 30 * 86400, 10, 300, 7)
    assert (s.dpop_algorithms, s.iat_window) == (("ES256", "EdDSA"), 30)
    assert "read:humidity" in s.scopes and "device:power" in s.scopes  # added to the shipped catalogue


def test_override_file_values_reach_the_service(data_dir):
    (data_dir / "iotauth.toml").write_text(OVERRIDE)
    service = open_service(load_settings(data_dir))
    try:
        now = time.time()
        service.register_client("hygro-1", "read:humidity", None, now)
        reply = service.handle("device_authorization", {"client_id": "hygro-1"}, now)
        assert (reply["expires_in"], reply["interval"]) == (300, 7)
        assert reply["verification_uri"] == "https://auth.home.arpa/activate"
        assert service.dpop.window == 30 and service.dpop.algorithms == ("ES256", "EdDSA")
    finally:
        service.store.close()


# -- through the CLI: one line, exit 1, no traceback ----------------------------------------------------

def one_line_failure(result: Any) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


CLI_CASES = ("access_ttl 3600", "unknown key", "bad TOML", "dpop algorithm none",
             "scope template under the protocol prefix")


@pytest.mark.parametrize("text, message",
                         [pytest.param(t, m, id=i) for i, t, m in BAD_FILES if i in CLI_CASES])
def test_serve_with_a_bad_config_file_exits_1_with_one_line(tmp_path, text, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "iotauth.toml").write_text(text)
    line = one_line_failure(runner.invoke(app, ["serve", "--data-dir", str(data)]))
    assert line.startswith(f"error: {data / 'iotauth.toml'}: {message}")


def test_serve_with_a_bad_environment_override_exits_1_with_one_line(tmp_path):
    result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path / "data")],
                           env={"IOTAUTH_ACCESS_TOKEN_TTL": "abc"})
    expected = "error: IOTAUTH_ACCESS_TOKEN_TTL = 'abc' is not a whole number of seconds"
    assert one_line_failure(result) == expected


# -- opening the data dir ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    pytest.param(b"garbage!" * 1024, "file is not a database", id="garbage"),
    pytest.param(b"SQLite format 3\x00" + b"\xff" * 4080, "", id="a damaged header"),
    pytest.param(b"", "not an iotauth database", id="an empty file"),
])
def test_corrupt_database_is_a_clear_error_naming_the_file(data_dir, content, reason):
    db = data_dir / "iotauth.db"
    for extra in data_dir.glob("iotauth.db-*"):
        extra.unlink()
    db.write_bytes(content)
    with pytest.raises(DataDirError) as exc:
        open_service(load_settings(data_dir))
    message = str(exc.value)
    assert message.startswith(f"{db}: ") and reason in message and "\n" not in message
    line = one_line_failure(runner.invoke(app, ["clients", "list", "--data-dir", str(data_dir)]))
    assert line == f"error: {message}"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("key, reason", [
    pytest.param(b64u(secrets.token_bytes(32)), "wrong master key", id="another valid key"),
    pytest.param(b64u(secrets.token_bytes(16)), "IOTAUTH_MASTER_KEY must be 32 bytes", id="16 bytes"),
    pytest.param("not base64 at all!", "IOTAUTH_MASTER_KEY must be 32 bytes", id="not base64"),
    pytest.param("é" * 43, "IOTAUTH_MASTER_KEY must be 32 bytes", id="non-ASCII"),
])
def test_wrong_master_key_is_a_clear_error_at_open(data_dir, monkeypatch, key, reason):
    monkeypatch.setenv("IOTAUTH_MASTER_KEY", key)
    with pytest.raises(DataDirError) as exc:
        open_service(load_settings(data_dir))
    message = str(exc.value)
    assert reason in message and "\n" not in message
    if reason == "wrong master key":
        assert message.endswith("(master key from the IOTAUTH_MASTER_KEY environment variable)")
    line = one_line_failure(runner.invoke(app, ["clients", "list", "--data-dir", str(data_dir)],
                                          env={"IOTAUTH_MASTER_KEY": key}))
    assert reason in line


def test_the_right_master_key_from_the_environment_opens_the_data_dir(data_dir, monkeypatch):
    key_file = data_dir.parent / f"{data_dir.name}.masterkey"
    monkeypatch.setenv("IOTAUTH_MASTER_KEY", key_file.read_text().strip())
    os.rename(key_file, key_file.with_suffix(".moved"))
    open_service(load_settings(data_dir)).store.close()


def test_missing_master_key_file_is_a_clear_error(data_dir):
    (data_dir.parent / f"{data_dir.name}.masterkey").unlink()
    with pytest.raises(DataDirError, match="no master key: set IOTAUTH_MASTER_KEY or run `iotauth init`"):
        open_service(load_settings(data_dir))


@pytest.mark.parametrize("content", [b"abcde\n", "é\n".encode()], ids=["bad base64", "non-ASCII"])
def test_damaged_master_key_file_is_a_clear_error(data_dir, content):
    path = data_dir.parent / f"{data_dir.name}.masterkey"
    path.write_bytes(content)
    with pytest.raises(DataDirError, match="not a 32-byte base64url master key"):
        open_service(load_settings(data_dir))


def test_master_key_file_readable_by_others_is_refused(data_dir):
    path = data_dir.parent / f"{data_dir.name}.masterkey"
    path.chmod(0o644)
    with pytest.raises(DataDirError) as exc:
        open_service(load_settings(data_dir))
    assert str(exc.value) == (f"{data_dir}: {path}: the master key file is readable by other users; "
                              f"run `chmod 600 {path}`")


def test_an_override_that_is_not_a_file_is_refused(tmp_path):
    (tmp_path / "iotauth.toml").mkdir(parents=True)
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'iotauth.toml'}: not a file"
