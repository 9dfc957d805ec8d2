"""device_sim against the real server: a simulated ESP32 pairs, works, refreshes, loses its grant, restarts.

Every device runs in its own thread (`Device.start`) and talks to the real broker
and service over loopback sockets. Device and server share the server's FakeClock
(`now=quick.clock.now`), so 14 minutes pass in one `advance`; the tests wait on the
device's events, never on sleep.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authsvc.dpop import jwk_thumbprint as server_thumbprint
from device_sim.device import Device
from device_sim.errors import DeviceSimError
from device_sim.events import DeviceEvent, EventRecorder
from device_sim.flow import DEVICE_CODE_GRANT, REFRESH_GRANT
from device_sim.sealed_state import SealedStore
from tests.conftest import DEVICES, ServerThread, start_server
from tests.wire import decode_jwt

WAIT = 10.0  # seconds: generous upper bound for one step; a passing step takes about one poll interval
PAST_REFRESH_POINT = 841  # access tokens live 900 s; the device refreshes 60 s before expiry
THERMO_TEMPERATURE = "home/thermo-1/temperature"
THERMO_POWER_SET = "home/thermo-1/power/set"


@pytest.fixture
def quick(settings, clock) -> Iterator[ServerThread]:
    """The real server, polling every second instead of five."""
    srv = start_server(settings, clock, "[tokens]\npoll_interval = 1\n")
    yield srv
    srv.stop()


MakeDevice = Callable[..., tuple[Device, EventRecorder]]


@pytest.fixture
def make_device(quick: ServerThread) -> Iterator[MakeDevice]:
    """Build devices for the registered clients; every one is stopped before the server."""
    made: list[Device] = []

    def make(client_id: str, *, store: Any = None, now: Callable[[], float] | None = None
             ) -> tuple[Device, EventRecorder]:
        events = EventRecorder()
        device = Device(client_id, DEVICES[client_id][0], port=quick.mqtt_port,
                        audience=quick.service.settings.audience, interval=5.0, store=store,
                        now=now or quick.clock.now, on_event=events, request_timeout=5.0, keepalive=30)
        made.append(device)
        return device, events

    yield make
    for device in made:
        device.stop()


def start_and_approve(quick: ServerThread, device: Device, events: EventRecorder) -> DeviceEvent:
    """Start the device, approve the code it shows, return its ``connected`` event."""
    device.start()
    shown = events.wait_for("code_shown", WAIT)
    quick.approve(shown.data["user_code"])
    return events.wait_for("connected", WAIT)


def index_of(events: EventRecorder, event: DeviceEvent) -> int:
    return next(i for i, e in enumerate(events.events) if e is event)


def stored_refresh_row(quick: ServerThread, refresh_token: str) -> Any:
    return quick.call(lambda: quick.service.store.refresh_token(quick.service.hash_refresh(refresh_token)))


# -- (1) pairing, key binding, data flow ----------------------------------------------------
def test_thermostat_pairs_gets_a_token_bound_to_its_key_and_the_panel_receives_its_readings(quick, make_device):
    panel, p_events = make_device("panel-1")
    start_and_approve(quick, panel, p_events)
    p_events.wait_for("subscribed", WAIT, where=lambda d: d["topic"] == "home/+/temperature")

    thermo, t_events = make_device("thermo-1")
    thermo.start()
    shown = t_events.wait_for("code_shown", WAIT)
    assert shown.data["interval"] == 1 and shown.data["verification_uri"].endswith("/activate")
    quick.approve(shown.data["user_code"])
    received = t_events.wait_for("tokens_received", WAIT)
    connected = t_events.wait_for("connected", WAIT)
    assert index_of(t_events, shown) < index_of(t_events, received) < index_of(t_events, connected)
    assert received.data["grant_type"] == DEVICE_CODE_GRANT
    assert received.data["scope"] == "write:temperature device:power"
    assert thermo.connected

    _, claims = decode_jwt(thermo.tokens.access_token)
    assert claims["client_id"] == "thermo-1"
    assert claims["cnf"] == {"jkt": thermo.thumbprint}
    assert server_thumbprint(thermo.public_jwk) == thermo.thumbprint  # the server computes the same RFC 7638 value

    sent = t_events.wait_for("published", WAIT, where=lambda d: d["topic"] == THERMO_TEMPERATURE)
    got = p_events.wait_for("received", WAIT, where=lambda d: d["topic"] == THERMO_TEMPERATURE)
    assert got.data["payload"] == sent.data["payload"]
    assert isinstance(got.data["payload"]["celsius"], float | int)


# -- (2) the panel commands the thermostat ---------------------------------------------------
def test_panel_power_command_switches_the_thermostat_on(quick, make_device):
    thermo, t_events = make_device("thermo-1")
    start_and_approve(quick, thermo, t_events)
    t_events.wait_for("subscribed", WAIT, where=lambda d: d["topic"] == THERMO_POWER_SET)
    panel, p_events = make_device("panel-1")
    start_and_approve(quick, panel, p_events)
    assert thermo.power == "off"

    panel.send_power_command("thermo-1", "on")

    command = t_events.wait_for("received", WAIT, where=lambda d: d["topic"] == THERMO_POWER_SET)
    assert command.data["payload"] == {"power": "on"}
    t_events.wait_for("power", WAIT, where=lambda d: d["state"] == "on")
    assert thermo.power == "on"


# -- (3) refresh before expiry, rotation, and work goes on --------------------------------------
def test_device_refreshes_before_expiry_rotates_its_refresh_token_and_keeps_publishing(quick, make_device):
    panel, p_events = make_device("panel-1")
    start_and_approve(quick, panel, p_events)
    thermo, t_events = make_device("thermo-1")
    start_and_approve(quick, thermo, t_events)
    old_refresh, old_access = thermo.refresh_token, thermo.tokens.access_token
    assert old_refresh is not None
    t_mark, p_mark = len(t_events.events), len(p_events.events)

    quick.clock.advance(PAST_REFRESH_POINT)

    refreshed = t_events.wait_for("tokens_received", WAIT, after=t_mark)
    assert refreshed.data["grant_type"] == REFRESH_GRANT
    t_events.wait_for("disconnected", WAIT, after=t_mark, where=lambda d: d["reason"] == "refresh")
    t_events.wait_for("connected", WAIT, after=index_of(t_events, refreshed))
    assert thermo.tokens.access_token != old_access
    assert thermo.refresh_token not in (None, old_refresh)
    # rotated at the server: the old token is spent and names the new one as its successor
    old_row = stored_refresh_row(quick, old_refresh)
    new_row = stored_refresh_row(quick, thermo.refresh_token)
    assert old_row.used is not None and old_row.successor_hash == new_row.token_hash
    assert new_row.used is None

    # the panel has refreshed and subscribed again too; the next reading reaches it over the new sessions
    p_events.wait_for("tokens_received", WAIT, after=p_mark, where=lambda d: d["grant_type"] == REFRESH_GRANT)
    resubscribed = p_events.wait_for("subscribed", WAIT, after=p_mark, where=lambda d: d["topic"] == "home/+/temperature")
    mark = index_of(p_events, resubscribed)
    quick.clock.advance(thermo.interval)
    got = p_events.wait_for("received", WAIT, after=mark, where=lambda d: d["topic"] == THERMO_TEMPERATURE)
    assert got.data["payload"]["ts"] >= int(quick.clock.now()) - thermo.interval
    assert thermo.connected and thermo.error is None


# -- (4) revocation ----------------------------------------------------------------------------
def test_revoked_device_is_disconnected_loses_its_grant_and_pairs_again(quick, make_device):
    thermo, t_events = make_device("thermo-1")
    start_and_approve(quick, thermo, t_events)
    first_code = t_events.wait_for("code_shown").data["user_code"]
    t_events.wait_for("published", WAIT, where=lambda d: d["topic"] == THERMO_TEMPERATURE)  # at work
    thermo.publish_reading(wait=WAIT)  # acknowledged: the broker has read every packet the device sent so far
    mark = len(t_events.events)

    assert quick.call(quick.service.revoke_client, "thermo-1", quick.clock.now()) == 1

    lost = t_events.wait_for("disconnected", WAIT, after=mark, where=lambda d: d["reason"] == "lost")
    grant_lost = t_events.wait_for("grant_lost", WAIT, after=mark)
    assert grant_lost.data["error"] == "invalid_grant"
    shown = t_events.wait_for("code_shown", WAIT, after=mark)
    assert index_of(t_events, lost) < index_of(t_events, grant_lost) < index_of(t_events, shown)
    assert shown.data["user_code"] != first_code
    assert thermo.refresh_token is None  # forgotten with the grant

    quick.approve(shown.data["user_code"])
    again = t_events.wait_for("tokens_received", WAIT, after=index_of(t_events, shown))
    assert again.data["grant_type"] == DEVICE_CODE_GRANT
    t_events.wait_for("connected", WAIT, after=index_of(t_events, again))
    assert thermo.connected


def revoke_mid_burst(quick: ServerThread, device: Device, events: EventRecorder) -> int:
    """Revoke the device's grant while it publishes as fast as it can; the index of its ``disconnected`` event."""
    done = threading.Event()

    def keep_publishing() -> None:
        while not done.is_set() and device.connected:
            try:
                device.publish_reading()
            except (DeviceSimError, ConnectionError):  # the session is gone: what the test waits for
                return

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        events.wait_for("published", WAIT, after=len(events.events) + 20)  # mid-burst
        mark = len(events.events)
        quick.call(quick.service.revoke_client, device.client_id, quick.clock.now())
        lost = events.wait_for("disconnected", 3, after=mark, where=lambda d: d["reason"] == "lost")
        return index_of(events, lost)
    finally:
        done.set()
        publisher.join(WAIT)


def test_revocation_disconnects_a_device_even_while_it_is_publishing(quick, make_device):
    thermo, events = make_device("thermo-1")
    start_and_approve(quick, thermo, events)
    for _ in range(3):  # the race hits about 9 times in 10: three rounds make a miss very unlikely
        lost = revoke_mid_burst(quick, thermo, events)  # the server's part: closed within 3 s
        # the device's part: notice, fail to refresh (perhaps after a request timeout and a back-off), pair again
        shown = events.wait_for("code_shown", 3 * WAIT, after=lost)
        quick.approve(shown.data["user_code"])
        events.wait_for("connected", WAIT, after=index_of(events, shown))


# -- (5) restart from sealed state ---------------------------------------------------------------
def test_restarted_device_refreshes_from_its_sealed_state_instead_of_pairing(quick, make_device, tmp_path):
    path = tmp_path / "devices" / "thermo-1.state"
    first, first_events = make_device("thermo-1", store=SealedStore.open(path, env={}))
    start_and_approve(quick, first, first_events)
    jkt, refresh_before = first.thumbprint, first.refresh_token
    first.stop()
    assert first_events.wait_for("stopped", 0).data["error"] is None

    second, events = make_device("thermo-1", store=SealedStore.open(path, env={}))
    second.start()
    events.wait_for("connected", WAIT)
    assert "code_shown" not in events.names()
    assert events.wait_for("key_ready", 0).data == {"jkt": jkt, "created": False}
    assert events.wait_for("tokens_received", 0).data["grant_type"] == REFRESH_GRANT
    assert second.thumbprint == jkt
    assert second.refresh_token not in (None, refresh_before)
    _, claims = decode_jwt(second.tokens.access_token)
    assert claims["cnf"] == {"jkt": jkt}


# -- (6) a device whose clock is behind the server's -------------------------------------------
def test_device_with_a_lagging_clock_pairs_and_refreshes_by_retrying_with_the_server_nonce(
        quick, make_device, caplog):
    caplog.set_level(logging.INFO, logger="iotauth")
    lag = 400  # far outside the 60 s iat window
    thermo, events = make_device("thermo-1", now=lambda: quick.clock.now() - lag)

    # pairing: the first proof has no nonce and an iat 400 s old; the server answers use_dpop_nonce
    start_and_approve(quick, thermo, events)
    nonce_errors = [r.getMessage() for r in caplog.records if "-> use_dpop_nonce" in r.getMessage()]
    assert any(m.startswith("device_authorization -> use_dpop_nonce") for m in nonce_errors), nonce_errors
    assert thermo.dpop_nonce == quick.service.current_nonce(quick.clock.now())

    # refresh: 14 minutes later the stored nonce is three steps old; the device retries with the new one
    caplog.clear()
    mark = len(events.events)
    quick.clock.advance(PAST_REFRESH_POINT)
    refreshed = events.wait_for("tokens_received", WAIT, after=mark)
    assert refreshed.data["grant_type"] == REFRESH_GRANT
    events.wait_for("connected", WAIT, after=index_of(events, refreshed))
    assert any(r.getMessage().startswith("token -> use_dpop_nonce") for r in caplog.records)
    assert thermo.dpop_nonce == quick.service.current_nonce(quick.clock.now())
    assert "grant_lost" not in events.names() and thermo.error is None


# -- (7) secrets at rest ------------------------------------------------------------------------
def test_sealed_state_file_holds_neither_the_refresh_token_nor_the_private_key_in_plaintext(
        quick, make_device, tmp_path):
    path = tmp_path / "devices" / "thermo-1.state"
    thermo, events = make_device("thermo-1", store=SealedStore.open(path, env={}))
    start_and_approve(quick, thermo, events)

    saved = SealedStore.open(path, env={}).load()  # the file really holds both secrets, sealed
    assert saved is not None and thermo.refresh_token is not None
    assert saved.refresh_token == thermo.refresh_token
    private_d = saved.private_jwk["d"]
    assert len(private_d) >= 43

    raw = path.read_bytes()
    text = raw.decode("ascii")
    for secret in (saved.refresh_token, private_d, thermo.tokens.access_token):
        assert secret not in text
    envelope = json.loads(text)
    assert set(envelope) == {"format", "version", "nonce", "ciphertext"}
    for name in ("refresh_token", "private_jwk", '"d"'):
        assert name not in text
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600


# (where the limit lives, its attribute, the value that refuses everything, the normal value, what the device sees)
BUSY = {
    "service proof quota": (lambda srv: srv.service.dpop.jtis, "per_source", 0, 5000, "temporarily_unavailable"),
    "broker bootstrap cap": (lambda srv: srv.run.broker.limiter, "bootstrap_sessions", 0, 50,
                             "server unavailable (CONNACK 3)"),
}


@pytest.mark.parametrize("limit", BUSY)
def test_device_waits_out_a_refusal_to_try_later_and_then_pairs(quick, make_device, limit):
    holder, name, refuse_all, normal, seen = BUSY[limit]
    quick.call(setattr, holder(quick), name, refuse_all)
    thermo, events = make_device("thermo-1")
    thermo.start()
    refused = events.wait_for("error", WAIT)
    assert seen in refused.data["message"] and refused.data["retry_in"] > 0
    quick.call(setattr, holder(quick), name, normal)
    shown = events.wait_for("code_shown", 3 * WAIT)
    quick.approve(shown.data["user_code"])
    assert events.wait_for("connected", WAIT)
    assert thermo.error is None
