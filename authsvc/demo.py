"""`iotauth demo`: serve, pair a simulated thermostat and wall panel, and narrate what happens.

The devices are `device_sim` devices speaking only the wire protocol; `--auto-approve` approves their
codes through `AuthService.decide`, the path `iotauth approve` and the /activate page use.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authsvc.config import Settings
from authsvc.datadir import ADMIN_USER, init_data_dir
from authsvc.errors import ActivationError
from authsvc.runtime import Running, running
from device_sim.cli import render_qr
from device_sim.device import Device
from device_sim.events import DeviceEvent
from device_sim.sealed_state import SealedStore

THERMOSTAT = ("thermo-1", "write:temperature device:power", "Living-room thermostat")
PANEL = ("panel-1", "read:temperature control:power", "Hall wall panel")
OUTSIDE_SCOPE_TOPIC = "home/panel-1/temperature"  # the thermostat may publish only its own readings
SWITCH_EVERY = 8.0  # seconds between the panel's power commands

Echo = Callable[[str], Any]


class Narrator:
    """Turns device events and broker refusals into one line each."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo

    def device_event(self, client_id: str, event: DeviceEvent) -> None:
        d = event.data
        if event.name == "code_shown":
            self.echo(f"[{client_id}] shows code {d['user_code']}: approve it at {d['verification_uri']}")
            if d.get("verification_uri_complete"):
                with contextlib.suppress(Exception):
                    render_qr(d["verification_uri_complete"], _EchoFile(self.echo))
        elif event.name == "tokens_received":
            self.echo(f"[{client_id}] received a DPoP-bound access token for {d['scope']!r}")
        elif event.name == "connected":
            self.echo(f"[{client_id}] connected to the broker with its token")
        elif event.name == "received" and client_id == PANEL[0] and d["topic"].endswith("/temperature"):
            source = d["topic"].split("/")[1]
            celsius = d["payload"].get("celsius") if isinstance(d["payload"], dict) else d["payload"]
            self.echo(f"[{client_id}] reading from {source}: {celsius} °C")
        elif event.name == "power" and client_id == THERMOSTAT[0]:
            self.echo(f"[{client_id}] power is now {d['state']} (switched by {PANEL[0]})")
        elif event.name in ("refused", "grant_lost", "error"):
            self.echo(f"[{client_id}] {event.name}: {d}")

    def refused(self, client_id: str | None, action: str, topic: str) -> None:
        if action == "publish":
            self.echo(f"[broker] refused {client_id}'s publish to {topic}: outside its scopes")


class _EchoFile:
    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.echo(line)
        return len(text)

    def flush(self) -> None:
        pass


def _ensure_clients(run: Running) -> None:
    for client_id, scope, name in (THERMOSTAT, PANEL):
        if run.service.store.client(client_id) is None:
            run.service.register_client(client_id, scope, name, time.time())


async def run_demo(settings: Settings, *, auto_approve: bool, echo: Echo,
                   stop: asyncio.Event | None = None) -> None:
    if not settings.db_path.exists():
        report = init_data_dir(settings, force=False, now=time.time())
        echo(f"initialised {report.data_dir}")
        if report.admin_password:
            echo(f"admin password (shown once): {report.admin_password}")
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    narrator = Narrator(echo)
    async with running(settings) as run:
        _ensure_clients(run)
        run.gate.on_acl_denied.append(narrator.refused)
        echo(f"iotauth is running: MQTT on {settings.mqtt_host}:{run.mqtt_port}, "
             f"pages at {run.service.settings.issuer}/activate (user {ADMIN_USER}). Ctrl-C stops.")

        def approve(user_code: str) -> None:
            try:
                request = run.service.decide(user_code, ADMIN_USER, True, time.time())
                echo(f"[demo] approved {request.user_code} for {request.client_id} (--auto-approve)")
            except ActivationError as exc:
                echo(f"[demo] could not approve {user_code}: {exc.message}")

        def observer(client_id: str) -> Callable[[DeviceEvent], None]:
            def on_event(event: DeviceEvent) -> None:
                loop.call_soon_threadsafe(narrator.device_event, client_id, event)
                if auto_approve and event.name == "code_shown":
                    loop.call_soon_threadsafe(approve, event.data["user_code"])
            return on_event

        state_dir = settings.data_dir / "demo"
        devices = {cid: _device(cid, scope, run.mqtt_port, state_dir, observer(cid))
                   for cid, scope, _ in (THERMOSTAT, PANEL)}
        for device in devices.values():
            device.start()
        try:
            await _drive(devices, stop, echo)
        finally:
            await asyncio.gather(*(asyncio.to_thread(d.stop) for d in devices.values()), return_exceptions=True)
    echo("demo stopped")


def _device(client_id: str, scope: str, port: int, state_dir: Path, on_event: Callable[[DeviceEvent], None]
            ) -> Device:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SealedStore.open(state_dir / f"{client_id}.state")
    return Device(client_id, scope, port=port, store=store, on_event=on_event, interval=3.0)


async def _drive(devices: dict[str, Device], stop: asyncio.Event, echo: Echo) -> None:
    """Once both devices are connected: one publish outside the thermostat's scopes, then the panel
    switches the thermostat's power every few seconds."""
    thermo, panel = devices[THERMOSTAT[0]], devices[PANEL[0]]
    tried_outside = False
    state = "off"
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SWITCH_EVERY)
        if stop.is_set() or not (thermo.connected and panel.connected):
            continue
        try:
            if not tried_outside:
                echo(f"[{THERMOSTAT[0]}] tries to publish to {OUTSIDE_SCOPE_TOPIC} ...")
                await asyncio.to_thread(thermo.publish_json, OUTSIDE_SCOPE_TOPIC, {"celsius": 99.9}, 5.0)
                tried_outside = True
            state = "on" if state == "off" else "off"
            echo(f"[{PANEL[0]}] switches {THERMOSTAT[0]} {state}")
            await asyncio.to_thread(panel.send_power_command, THERMOSTAT[0], state)
        except Exception as exc:  # a device mid-reconnect; the next round tries again
            echo(f"[demo] {type(exc).__name__}: {exc}")


