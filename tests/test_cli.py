"""The `iotauth` command as a user meets it: help everywhere, one-line errors, clean start and stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from authsvc.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [["init"], ["clients", "add"], ["clients", "list"], ["clients", "remove"], ["serve"], ["approve"],
            ["deny"], ["revoke"], ["demo"]]


def iotauth(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None):
    extra = ["--data-dir", str(data_dir)] if data_dir else []
    return runner.invoke(app, [*args, *extra], env=env)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_and_is_in_the_readme(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"iotauth {' '.join(command)}" in (ROOT / "README.md").read_text()


def test_init_creates_a_private_data_dir_and_refuses_to_clobber(tmp_path):
    data = tmp_path / "data"
    first = iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": ""})
    assert first.exit_code == 0, first.output
    assert "admin password (shown once):" in first.output
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data.masterkey").stat().st_mode) == 0o600
    again = iotauth("init", data_dir=data)
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [
        f"error: {data} already holds an iotauth database; use --force to start over"]
    forced = iotauth("init", "--force", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"})
    assert forced.exit_code == 0 and "IOTAUTH_ADMIN_PASSWORD" in forced.output


def test_signing_key_is_never_plaintext_on_disk(tmp_path):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    from authsvc.config import load_settings
    from authsvc.datadir import open_service

    service = open_service(load_settings(data))
    d = service.keys.active.key.as_dict(private=True)["d"]
    service.store.close()
    for path in data.iterdir():
        assert d.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(("args", "message"), [
    (["clients", "add", "a/b", "--scope", "read:temperature"],
     "error: client id 'a/b' must be 1-64 characters of A-Z a-z 0-9 . _ -"),
    (["clients", "add", "lamp-9", "--scope", "fly:away"], "error: unknown scope 'fly:away'"),
    (["clients", "add", "lamp-9", "--scope", ""], "error: --scope must name at least one scope"),
    (["clients", "remove", "nobody"], "error: no client 'nobody'"),
    (["approve", "ZZZ999"], "error: No pending request has that code."),
    (["deny", "ZZZ999"], "error: No pending request has that code."),
    (["approve", "ABC234", "--user", "mallory"], "error: no local account 'mallory'"),
    (["revoke", "--client", "nobody"], "error: no client 'nobody'"),
])
def test_user_errors_are_one_line_and_exit_1(tmp_path, args, message):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    result = iotauth(*args, data_dir=data)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output


def test_commands_before_init_say_what_to_do(tmp_path):
    result = iotauth("clients", "list", data_dir=tmp_path / "nothing")
    assert result.exit_code == 1
    assert "run `iotauth init` first" in result.output


def test_clients_add_list_remove(tmp_path):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    assert iotauth("clients", "add", "smart-fridge-001", "--scope", "read:temperature", "--name", "Fridge",
                   data_dir=data).exit_code == 0
    dup = iotauth("clients", "add", "smart-fridge-001", "--scope", "read:temperature", data_dir=data)
    assert dup.exit_code == 1 and "already registered" in dup.output
    listed = iotauth("clients", "list", data_dir=data)
    assert "smart-fridge-001\tread:temperature\tFridge\tnot paired" in listed.output
    assert iotauth("clients", "remove", "smart-fridge-001", data_dir=data).exit_code == 0
    assert "no clients registered" in iotauth("clients", "list", data_dir=data).output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_then_stops_cleanly_on_signal(tmp_path, sig):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    http_port, mqtt_port = _free_port(), _free_port()
    env = {**os.environ, "IOTAUTH_DATA_DIR": str(data)}
    proc = subprocess.Popen([sys.executable, "-m", "authsvc", "serve", "--mqtt-port", str(mqtt_port),
                             "--http-port", str(http_port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"serve did not come up: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
        meta = httpx.get(f"http://127.0.0.1:{http_port}/.well-known/oauth-authorization-server").json()
        assert meta["issuer"] == f"http://localhost:{http_port}"
        with socket.create_connection(("127.0.0.1", mqtt_port), timeout=2):
            pass
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr


def test_serve_with_bad_config_is_one_line(tmp_path):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    (data / "iotauth.toml").write_text("[tokens]\naccess_ttl = 3600\n")
    result = iotauth("serve", data_dir=data)
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {data / 'iotauth.toml'}: tokens.access_ttl = 3600 exceeds the 900 s maximum"


@pytest.mark.parametrize(("listener", "busy_option", "other_option"), [
    ("HTTP", "--http-port", "--mqtt-port"),
    ("MQTT", "--mqtt-port", "--http-port"),
])
def test_serve_on_a_busy_port_is_one_line(tmp_path, listener, busy_option, other_option):
    data = tmp_path / "data"
    assert iotauth("init", data_dir=data, env={"IOTAUTH_ADMIN_PASSWORD": "pw"}).exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = iotauth("serve", busy_option, str(port), other_option, "0", data_dir=data)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: cannot listen for {listener} on 127.0.0.1:{port}: address already in use"]


def test_an_empty_data_dir_is_refused_not_taken_as_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", "--data-dir", ""], env={"IOTAUTH_ADMIN_PASSWORD": "pw"})
    assert result.exit_code == 1, result.output
    assert result.output.strip() == ("error: --data-dir (or IOTAUTH_DATA_DIR) is empty: name a directory, "
                                     "e.g. ~/.local/share/iotauth")
    assert list(tmp_path.iterdir()) == []
