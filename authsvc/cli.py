"""The `iotauth` command: thin typer commands over the library; known errors become one line and exit 1."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from authsvc.config import ConfigError, Settings, default_data_dir, load_settings
from authsvc.datadir import ADMIN_USER, DataDirError, init_data_dir, open_service
from authsvc.errors import ActivationError, RegistrationError
from authsvc.keyring import KeyRing
from authsvc.keys import SealError, SigningKey
from authsvc.service import AuthService
from authsvc.store import StoreError
from authsvc.tokens import TIME_LEEWAY

app = typer.Typer(help="iotauth: local, MQTT-native OAuth 2.0 for personal IoT devices.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
clients_app = typer.Typer(help="Register, list and remove devices (OAuth clients).", no_args_is_help=True)
app.add_typer(clients_app, name="clients")
keys_app = typer.Typer(help="List and rotate the keys that sign access tokens.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

KNOWN_ERRORS = (ConfigError, DataDirError, RegistrationError, ActivationError, StoreError, SealError, OSError)
DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="IOTAUTH_DATA_DIR",
                                              help="Data directory [default: ~/.local/share/iotauth]")]
_global: dict[str, Path | None] = {"data_dir": None}


@app.callback()
def _main(data_dir: DataDir = None) -> None:
    _global["data_dir"] = data_dir
    # one-shot commands report in their own words; the service's log lines are for `serve` and `demo`
    logging.getLogger("iotauth").addHandler(logging.NullHandler())


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def known_errors() -> Iterator[None]:
    try:
        yield
    except KNOWN_ERRORS as exc:
        message = exc.message if isinstance(exc, ActivationError) else str(exc)
        fail(message)


def settings_for(data_dir: Path | None) -> Settings:
    chosen = data_dir or _global["data_dir"]
    if chosen is not None and str(chosen).strip() in ("", "."):
        raise ConfigError("--data-dir (or IOTAUTH_DATA_DIR) is empty: name a directory, e.g. ~/.local/share/iotauth")
    return load_settings(chosen or default_data_dir())


@contextmanager
def opened(data_dir: Path | None) -> Iterator[AuthService]:
    with known_errors():
        service = open_service(settings_for(data_dir))
        try:
            yield service
        finally:
            service.store.close()


@app.command()
def init(data_dir: DataDir = None,
         force: Annotated[bool, typer.Option("--force", help="Wipe an existing data dir and start over")] = False
         ) -> None:
    """Create the data dir, database, signing key and the `admin` account."""
    with known_errors():
        report = init_data_dir(settings_for(data_dir), force=force, now=time.time())
    typer.echo(f"initialised {report.data_dir} (mode 0700)")
    typer.echo(f"secrets are sealed with the master key from {report.master_key_source}")
    if report.admin_password:
        typer.echo(f"admin password (shown once): {report.admin_password}")
    else:
        typer.echo("admin password taken from IOTAUTH_ADMIN_PASSWORD")


@clients_app.command("add")
def clients_add(client_id: Annotated[str, typer.Argument(help="Client id, e.g. smart-fridge-001")],
                scope: Annotated[str, typer.Option("--scope", help='Space-separated scopes, e.g. "read:temperature"')],
                name: Annotated[str | None, typer.Option("--name", help="Name shown on the consent page")] = None,
                data_dir: DataDir = None) -> None:
    """Register a device with the scopes it may ask for."""
    with opened(data_dir) as service, known_errors():
        service.register_client(client_id, scope, name, time.time())
    typer.echo(f"registered {client_id} ({scope})")


@clients_app.command("list")
def clients_list(data_dir: DataDir = None) -> None:
    """List registered devices."""
    with opened(data_dir) as service:
        rows = service.store.clients()
        live = {g.client_id for g in service.store.live_grants()}
    if not rows:
        typer.echo("no clients registered")
    for row in rows:
        state = "paired" if row["client_id"] in live else "not paired"
        typer.echo(f"{row['client_id']}\t{row['scope']}\t{row['name']}\t{state}")


@clients_app.command("remove")
def clients_remove(client_id: str, data_dir: DataDir = None) -> None:
    """Remove a device; its grants are revoked and live sessions closed."""
    with opened(data_dir) as service, known_errors():
        service.remove_client(client_id, time.time())
    typer.echo(f"removed {client_id}")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_state(keys: KeyRing, key: SigningKey, now: float) -> str:
    if key.retired is None:
        return "active"
    until = keys.published_until(key)
    shown = "published until" if now < until else "no longer published since"
    return f"retired {_when(key.retired)}, {shown} {_when(until)}"


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List the signing keys: kid, created, and active or retired (and until when still published)."""
    now = time.time()
    with opened(data_dir) as service:
        keys = service.keys
        for key in keys.all_keys():
            typer.echo(f"{key.kid}\tcreated {_when(key.created)}\t{_key_state(keys, key, now)}")


@keys_app.command("rotate")
def keys_rotate(data_dir: DataDir = None) -> None:
    """Make a new ES256 signing key active; the old one stays published until every token it signed expired.

    A running `iotauth serve` picks the new key up within a second, without a restart."""
    with opened(data_dir) as service, known_errors():
        rotation = service.keys.rotate(time.time())
    ttl = service.settings.access_ttl
    typer.echo(f"new signing key {rotation.new.kid} is active (a running server switches within a second)")
    typer.echo(f"the previous key {rotation.previous.kid} stays in the JWKS until {_when(rotation.published_until)}"
               f" (access token lifetime {ttl} s + {TIME_LEEWAY} s), then drops out")


@app.command()
def serve(mqtt_port: Annotated[int | None, typer.Option(help="MQTT port [default: from config, 1883]")] = None,
          http_port: Annotated[int | None, typer.Option(help="HTTP port [default: from config, 8080]")] = None,
          data_dir: DataDir = None) -> None:
    """Run the broker, the authorization service and the web pages in one process."""
    from authsvc.runtime import serve as run_serve

    _logging()
    with known_errors():
        settings = settings_for(data_dir).with_ports(mqtt_port=mqtt_port, http_port=http_port)
        asyncio.run(run_serve(settings))


def _decide(user_code: str, user: str, approve: bool, data_dir: Path | None) -> None:
    with opened(data_dir) as service, known_errors():
        if service.store.password_hash(user) is None:
            fail(f"no local account {user!r}")
        request = service.decide(user_code, user, approve, time.time())
    verb = "approved" if approve else "denied"
    typer.echo(f"{verb} {request.user_code} for {request.client_id} ({' '.join(s for s, _ in request.scopes)})")


@app.command()
def approve(user_code: Annotated[str, typer.Argument(help="The code the device shows, e.g. ABC123")],
            user: Annotated[str, typer.Option("--user", help="Local account approving")] = ADMIN_USER,
            data_dir: DataDir = None) -> None:
    """Approve a device's pending request (same path as the /activate page)."""
    _decide(user_code, user, True, data_dir)


@app.command()
def deny(user_code: Annotated[str, typer.Argument(help="The code the device shows")],
         user: Annotated[str, typer.Option("--user", help="Local account denying")] = ADMIN_USER,
         data_dir: DataDir = None) -> None:
    """Deny a device's pending request."""
    _decide(user_code, user, False, data_dir)


@app.command()
def revoke(client: Annotated[str, typer.Option("--client", help="Client id whose grants to revoke")],
           data_dir: DataDir = None) -> None:
    """Revoke every grant of a device; a running server closes its sessions within 1 s."""
    with opened(data_dir) as service, known_errors():
        if service.store.client(client) is None:
            fail(f"no client {client!r}")
        count = service.revoke_client(client, time.time())
    typer.echo(f"revoked {count} grant(s) of {client}")


@app.command()
def demo(auto_approve: Annotated[bool, typer.Option("--auto-approve", help="Approve the demo devices "
                                                    "without the page (same path as `iotauth approve`)")] = False,
         mqtt_port: Annotated[int | None, typer.Option(help="MQTT port")] = None,
         http_port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
         data_dir: DataDir = None) -> None:
    """Serve, pair a simulated thermostat and wall panel, and show data flowing."""
    from authsvc.demo import run_demo

    _logging(quiet=True)
    with known_errors():
        asyncio.run(run_demo(settings_for(data_dir).with_ports(mqtt_port=mqtt_port, http_port=http_port),
                             auto_approve=auto_approve, echo=typer.echo))


def _logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not quiet else logging.ERROR)


def main() -> Any:
    try:
        return app()
    except KeyboardInterrupt:
        return 130


