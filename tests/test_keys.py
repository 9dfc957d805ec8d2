"""Keys and secrets at rest: `iotauth keys rotate` against a running server, and the master key's sources."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import keyring
import pytest
from jaraco.classes import properties
from keyring.backend import KeyringBackend
from keyring.backends import fail
from typer.testing import CliRunner

from authsvc.cli import app
from authsvc.config import load_settings
from authsvc.datadir import DataDirError, open_service
from authsvc.masterkey import KEYRING_ENV, KEYRING_SERVICE, MASTER_KEY_ENV
from authsvc.tokens import TIME_LEEWAY, TokenError, issue_access_token, verify_access_token
from tests.conftest import start_server
from tests.wire import Mqtt, decode_jwt

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
JWKS_TOPIC = "oauth/v1/jwks"


def iotauth(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)], env=env)


def one_line(result: Any) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kids(document: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in document["keys"]}


# -- rotation against the running server -------------------------------------------------------
def paired(server: Any, client_id: str) -> tuple[Any, dict[str, Any]]:
    from tests.wire import Device

    dev = Device(server.mqtt_port, client_id, server.clock)
    auth = dev.authorize()
    server.approve(auth["user_code"])
    tokens = dev.poll(auth["device_code"])
    assert tokens.get("token_type") == "DPoP", tokens
    return dev, tokens


def http_kids(server: Any) -> set[str]:
    return kids(httpx.get(f"{server.http_url}/.well-known/jwks.json").json())


def published(watcher: Mqtt, want: set[str]) -> bool:
    """The JWKS `watcher` last received on the topic names exactly `want`."""
    return bool(watcher.wait_for(lambda: (got := watcher.received(JWKS_TOPIC))
                                 and kids(json.loads(got[-1])) == want))


def retained_kids(server: Any) -> set[str]:
    """What a device subscribing now gets: the retained message."""
    fresh = Mqtt(server.mqtt_port, f"jwks{secrets.token_hex(4)}")
    assert fresh.connect() == 0
    fresh.subscribe(JWKS_TOPIC)
    (payload,) = fresh.wait_message(JWKS_TOPIC)[:1]
    assert fresh.flags[0] == (JWKS_TOPIC, 1, True)
    fresh.close()
    return kids(json.loads(payload))


def test_rotation_reaches_the_running_server_and_the_old_key_ages_out(server):
    clock, data_dir = server.clock, server.settings.data_dir
    dev, before = paired(server, "thermo-1")
    old_kid = decode_jwt(before["access_token"])[0]["kid"]
    old_exp = decode_jwt(before["access_token"])[1]["exp"]
    watcher = Mqtt(server.mqtt_port, "jwkswatcher")
    assert watcher.connect() == 0
    watcher.subscribe(JWKS_TOPIC)
    assert published(watcher, {old_kid})

    rotated = iotauth("keys", "rotate", data_dir=data_dir)
    assert rotated.exit_code == 0, rotated.output
    lines = rotated.output.strip().splitlines()
    new_kid = lines[0].split()[3]
    assert len(lines) == 2 and new_kid != old_kid
    assert lines[0].startswith(f"new signing key {new_kid} is active")
    assert lines[1].startswith(f"the previous key {old_kid} stays in the JWKS until ")
    assert "(access token lifetime 900 s + 60 s)" in lines[1]

    # without a restart: the live JWKS subscriber, a new subscriber and the HTTP endpoint show both keys
    assert published(watcher, {old_kid, new_kid})
    assert retained_kids(server) == {old_kid, new_kid} == http_kids(server)
    # new tokens carry the new kid, and the broker accepts them
    after = dev.refresh(before["refresh_token"])
    assert decode_jwt(after["access_token"])[0]["kid"] == new_kid
    assert dev.session(after["access_token"]).connack == 0
    # a token signed by the old key still connects until its exp
    clock.set(old_exp - 1)
    assert dev.session(before["access_token"]).connack == 0
    clock.set(old_exp)
    assert dev.session(before["access_token"]).connack == 5

    # the old key drops out by itself at retired + lifetime + leeway
    retired = next(k.retired for k in server.call(server.service.keys.all_keys) if k.kid == old_kid)
    clock.set(retired + 900 + TIME_LEEWAY - 1)
    assert http_kids(server) == {old_kid, new_kid}
    clock.set(retired + 900 + TIME_LEEWAY)
    assert published(watcher, {new_kid})
    assert retained_kids(server) == {new_kid} == http_kids(server)
    watcher.close()
    dev.close()


def test_rotating_twice_keeps_both_retired_keys_until_their_tokens_expire(data_dir):
    service = open_service(load_settings(data_dir))
    first = service.keys.active
    service.store.close()
    assert iotauth("keys", "rotate", data_dir=data_dir).exit_code == 0
    service = open_service(load_settings(data_dir))
    second = service.keys.active
    now = time.time()
    token, _ = issue_access_token(second, issuer=service.settings.issuer, audience=service.settings.audience,
                                  sub="admin", client_id="lamp-1", scope="device:power", jkt="x", now=now, ttl=900)
    service.store.close()
    assert iotauth("keys", "rotate", data_dir=data_dir).exit_code == 0

    service = open_service(load_settings(data_dir))
    try:
        third = service.keys.active
        assert len({first.kid, second.kid, third.kid}) == 3
        assert kids(service.keys.jwks()) == {first.kid, second.kid, third.kid}
        claims = verify_access_token(token, service.keys.verification_keys(), issuer=service.settings.issuer,
                                     audience=service.settings.audience, now=now + 899)
        assert claims.client_id == "lamp-1"
        listed = iotauth("keys", "list", data_dir=data_dir).output.strip().splitlines()
        assert [line.split("\t")[0] for line in listed] == [first.kid, second.kid, third.kid]
        assert listed[2].endswith("\tactive") and "retired" in listed[0] and "published until" in listed[1]
        # long after: only the active key is published, and an old token no longer verifies
        service.keys.refresh(now + 3600)
        assert kids(service.keys.jwks()) == {third.kid}
        with pytest.raises(TokenError):
            verify_access_token(token, service.keys.verification_keys(), issuer=service.settings.issuer,
                                audience=service.settings.audience, now=now + 3600)
    finally:
        service.store.close()


def test_a_later_rotation_deletes_keys_no_server_can_need(svc):
    start = time.time()
    first = svc.keys.active
    svc.keys.rotate(start)
    second = svc.keys.active
    svc.keys.rotate(start + 900 + TIME_LEEWAY - 1)  # a 900 s token of `first` may still be valid
    assert first.kid in {k.kid for k in svc.keys.all_keys()}
    svc.keys.rotate(start + 900 + TIME_LEEWAY + 1)
    assert [k.kid for k in svc.keys.all_keys()][:1] == [second.kid]
    assert len(svc.keys.all_keys()) == 3


@pytest.mark.parametrize("where", ["environment", "key file"])
def test_rotate_with_a_wrong_master_key_is_one_line_and_changes_nothing(data_dir, where):
    other = b64u(secrets.token_bytes(32))
    env: dict[str, str] = {}
    key_file = data_dir.parent / f"{data_dir.name}.masterkey"
    if where == "environment":
        env[MASTER_KEY_ENV] = other
        source = f"the {MASTER_KEY_ENV} environment variable"
    else:
        key_file.write_text(other + "\n")
        source = f"the key file {key_file}"
    before = sqlite3.connect(data_dir / "iotauth.db").execute("SELECT kid FROM signing_keys").fetchall()
    line = one_line(iotauth("keys", "rotate", data_dir=data_dir, env=env))
    assert line.startswith(f"error: {data_dir}: cannot open sealed ") and "wrong master key" in line
    assert line.endswith(f"(master key from {source})")
    after = sqlite3.connect(data_dir / "iotauth.db").execute("SELECT kid FROM signing_keys").fetchall()
    assert after == before


def test_keys_commands_have_help_and_are_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for command in (["keys", "rotate"], ["keys", "list"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
        assert f"iotauth {' '.join(command)}" in readme


# -- where the master key comes from -------------------------------------------------------------
class MemoryKeyring(KeyringBackend):
    """An in-memory keyring for tests; never chosen by keyring's own backend detection."""

    @properties.classproperty
    def priority(cls) -> float:
        raise RuntimeError("test backend: only through keyring.set_keyring()")

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}
        self.broken = broken

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        if self.broken:
            raise keyring.errors.PasswordSetError("locked")
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


@pytest.fixture
def os_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    """An in-memory OS keyring in place of whatever this machine has, restored afterwards."""
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    monkeypatch.delenv(KEYRING_ENV, raising=False)
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


def init(data: Path, env: dict[str, str] | None = None) -> list[str]:
    result = iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw", **(env or {})})
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()


def source_line(lines: list[str]) -> str:
    (line,) = [x for x in lines if x.startswith("secrets are sealed")]
    return line


def test_init_uses_the_environment_first_and_says_so(tmp_path, os_keyring):
    data, key = tmp_path / "data", b64u(secrets.token_bytes(32))
    lines = init(data, {MASTER_KEY_ENV: key})
    assert source_line(lines) == f"secrets are sealed with the master key from the {MASTER_KEY_ENV} environment" \
                                 " variable"
    assert not (tmp_path / "data.masterkey").exists() and os_keyring.entries == {}
    assert iotauth("keys", "list", data_dir=data, env={MASTER_KEY_ENV: key}).exit_code == 0
    line = one_line(iotauth("keys", "list", data_dir=data))
    assert line == f"error: {data}: no master key: this data dir was initialised with {MASTER_KEY_ENV}, which is" \
                   " not set"


def test_init_uses_a_usable_os_keyring_and_serve_finds_the_key_there(tmp_path, os_keyring, clock):
    data = tmp_path / "data"
    lines = init(data)
    entry = str(data.resolve())
    assert source_line(lines) == ("secrets are sealed with the master key from the OS keyring"
                                  f" (test keys MemoryKeyring) under service {KEYRING_SERVICE!r}, user {entry!r}")
    assert set(os_keyring.entries) == {(KEYRING_SERVICE, entry)}
    assert not (tmp_path / "data.masterkey").exists()
    server = start_server(load_settings(data).with_ports(mqtt_port=0, http_port=0), clock)
    try:
        assert httpx.get(f"{server.http_url}/health").json()["status"] == "ok"
    finally:
        server.stop()
    # a key file appearing later is not where this data dir looks
    (tmp_path / "data.masterkey").write_text(b64u(secrets.token_bytes(32)) + "\n")
    (tmp_path / "data.masterkey").chmod(0o600)
    assert iotauth("keys", "rotate", data_dir=data).exit_code == 0


def test_a_keyring_data_dir_without_its_keyring_is_one_line_naming_where_it_looked(tmp_path, os_keyring, clock):
    data = tmp_path / "data"
    init(data)
    entry = str(data.resolve())
    keyring.set_keyring(fail.Keyring())
    with pytest.raises(DataDirError) as exc:
        open_service(load_settings(data))
    assert str(exc.value) == (f"{data}: the master key is in the OS keyring (service {KEYRING_SERVICE!r}, user"
                              f" {entry!r}) but no keyring is available here; unlock it or set {MASTER_KEY_ENV}")
    keyring.set_keyring(os_keyring)
    os_keyring.entries.clear()
    with pytest.raises(DataDirError) as exc:  # what `iotauth serve` meets first
        start_server(load_settings(data).with_ports(mqtt_port=0, http_port=0), clock)
    assert str(exc.value) == (f"{data}: no master key in the OS keyring (test keys MemoryKeyring) under service"
                              f" {KEYRING_SERVICE!r}, user {entry!r}; set {MASTER_KEY_ENV} or run"
                              " `iotauth init --force`")
    line = one_line(iotauth("keys", "rotate", data_dir=data))
    assert line == f"error: {exc.value}"


@pytest.mark.parametrize("situation", ["no keyring", "disabled", "keyring refuses to store"])
def test_init_falls_back_to_the_key_file(tmp_path, os_keyring, monkeypatch, situation):
    if situation == "no keyring":
        keyring.set_keyring(fail.Keyring())
    elif situation == "disabled":
        monkeypatch.setenv(KEYRING_ENV, "0")
    else:
        keyring.set_keyring(MemoryKeyring(broken=True))
    data = tmp_path / "data"
    lines = init(data)
    path = tmp_path / "data.masterkey"
    assert source_line(lines) == f"secrets are sealed with the master key from the key file {path} (mode 0600)"
    assert path.exists() and os_keyring.entries == {}
    # the data dir keeps opening from the file even once a keyring is usable
    keyring.set_keyring(os_keyring)
    monkeypatch.delenv(KEYRING_ENV, raising=False)
    assert iotauth("keys", "list", data_dir=data).exit_code == 0
    assert os_keyring.entries == {}


def test_a_data_dir_from_before_sources_were_recorded_opens_with_the_key_file(data_dir):
    with sqlite3.connect(data_dir / "iotauth.db") as db:
        db.execute("DELETE FROM meta WHERE key LIKE 'master_key_%'")
    db.close()
    open_service(load_settings(data_dir)).store.close()
    (data_dir.parent / f"{data_dir.name}.masterkey").unlink()
    with pytest.raises(DataDirError, match="no master key: set IOTAUTH_MASTER_KEY or run `iotauth init`"):
        open_service(load_settings(data_dir))
