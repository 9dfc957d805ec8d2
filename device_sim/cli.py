"""``iotauth-device``: run a simulated device from the terminal (thin over device.py)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import segno
import typer

from device_sim import events as ev
from device_sim.device import DEFAULT_AUDIENCE, Device
from device_sim.errors import DeviceSimError
from device_sim.events import DeviceEvent
from device_sim.requests import DEFAULT_PREFIX
from device_sim.sealed_state import DIR_ENV, KEY_ENV, SealedStore, default_state_path

app = typer.Typer(
    help="A simulated ESP32: pairs with the iotauth service over MQTT (device flow + DPoP) and reports.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """A simulated ESP32: pairs with the iotauth service over MQTT (device flow + DPoP) and reports."""


def render_qr(uri: str, out: TextIO) -> None:
    """The URI as a QR code drawn with block characters."""
    segno.make(uri).terminal(out=out, compact=True)


def _show(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict | list) else str(value)


def describe(event: DeviceEvent) -> str:
    """One human-readable line per event (the QR code is drawn separately)."""
    d = event.data
    match event.name:
        case ev.KEY_READY:
            return f"device key {'created' if d['created'] else 'loaded'}, thumbprint {d['jkt']}"
        case ev.CODE_SHOWN:
            return (f"To pair, open {d['verification_uri']} and enter the code {d['user_code']} "
                    f"(valid {d['expires_in']} s)")
        case ev.POLLED:
            return f"waiting for approval ({d['error']}; next poll in {d['interval']:g} s)"
        case ev.TOKENS_RECEIVED:
            how = "refreshed" if d["grant_type"] == "refresh_token" else "paired"
            return f"{how}: scope '{d['scope']}', access token valid {d['expires_in']} s"
        case ev.CONNECTED:
            return f"connected to {d['host']}:{d['port']} as {d['client_id']}"
        case ev.SUBSCRIBED:
            return f"subscribed to {d['topic']}"
        case ev.PUBLISHED:
            return f"published {d['topic']} {_show(d['payload'])}"
        case ev.RECEIVED:
            return f"received {d['topic']} {_show(d['payload'])}"
        case ev.POWER:
            return f"power is {d['state']}"
        case ev.REFUSED if d["what"] == "connect":
            return f"refused: broker answered CONNECT with {d['code']} ({d['reason']})"
        case ev.REFUSED:
            return f"refused: subscription to {d['topic']} ({d['reason']})"
        case ev.DISCONNECTED:
            return f"disconnected ({d['reason']}{': ' + d['detail'] if d.get('detail') else ''})"
        case ev.GRANT_LOST:
            return f"grant lost ({d['error']}): pairing again"
        case ev.ERROR:
            return f"problem: {d['message']}; retrying in {d['retry_in']:g} s"
        case ev.STOPPED:
            return "stopped" if d["error"] is None else f"stopped: {d['error']}"
    return f"{event.name} {_show(d)}"


class EventPrinter:
    """``on_event`` for the terminal: a line per event, and the QR code with the user code."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: DeviceEvent) -> None:
        print(describe(event), file=self.out, flush=True)
        uri = event.data.get("verification_uri_complete") if event.name == ev.CODE_SHOWN else None
        if uri:
            print(f"or scan this code ({uri}):", file=self.out)
            render_qr(uri, self.out)
            self.out.flush()


StateOption = Annotated[
    Path | None,
    typer.Option("--state", metavar="FILE",
                 help=f"Sealed state file (default: CLIENT_ID.state in ${DIR_ENV} or "
                      f"~/.local/share/iotauth-device); its key is ${KEY_ENV} or FILE.key (created 0600)."),
]
ClientIdArg = Annotated[str, typer.Argument(metavar="CLIENT_ID", show_default=False,
                                            help="The registered client_id, e.g. thermo-1.")]
HostOption = Annotated[str, typer.Option("--host", help="Broker host or address.")]
PortOption = Annotated[int, typer.Option("--port", help="Broker MQTT port.")]


def _store(client_id: str, state: Path | None) -> SealedStore:
    return SealedStore.open(state if state is not None else default_state_path(client_id))


@app.command()
def run(
    client_id: ClientIdArg,
    scope: Annotated[str, typer.Option("--scope", help='Scopes to ask for, e.g. "write:temperature".',
                                       show_default=False)],
    host: HostOption = "127.0.0.1",
    port: PortOption = 1883,
    audience: Annotated[str, typer.Option("--audience", help="Broker audience: the htu of CONNECT proofs.")]
    = DEFAULT_AUDIENCE,
    state: StateOption = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between readings.")] = 5.0,
    once: Annotated[bool, typer.Option("--once", help="Pair, connect, publish one reading, exit.")] = False,
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix of the service.")] = DEFAULT_PREFIX,
) -> None:
    """Pair if needed, connect with token + DPoP proof, act out the scopes; Ctrl-C stops."""
    try:
        device = Device(client_id, scope, host=host, port=port, audience=audience, topic_prefix=prefix,
                        interval=interval, store=_store(client_id, state), on_event=EventPrinter(sys.stdout))
        device.run(once=once)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (DeviceSimError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def revoke(
    client_id: ClientIdArg,
    host: HostOption = "127.0.0.1",
    port: PortOption = 1883,
    state: StateOption = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix of the service.")] = DEFAULT_PREFIX,
) -> None:
    """Revoke the stored refresh token (RFC 7009 over MQTT) and forget it."""
    try:
        store = _store(client_id, state)
        saved = store.load()
        if saved is None or saved.refresh_token is None or not saved.scope:
            typer.echo(f"{client_id}: no refresh token stored; nothing to revoke")
            return
        device = Device(client_id, saved.scope, host=host, port=port, topic_prefix=prefix, store=store)
        try:
            device.revoke()
        finally:
            device.stop()
        typer.echo(f"{client_id}: refresh token revoked and forgotten")
    except (DeviceSimError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is a Ctrl-C: disconnect cleanly
    app()


if __name__ == "__main__":
    main()
