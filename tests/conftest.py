"""Fixtures: a real data dir, a real server (broker + HTTP) on ephemeral loopback ports, a fake clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authsvc.clock import FakeClock
from authsvc.config import Settings, load_settings
from authsvc.datadir import init_data_dir, open_service
from authsvc.errors import OAuthError
from authsvc.runtime import Running, running
from broker.server import HardenedBroker

# Tests never touch the developer's own OS keyring: `init` keeps the key file (subprocesses inherit this);
# tests/test_keys.py unsets it around an in-memory keyring backend.
os.environ["IOTAUTH_KEYRING"] = "0"

ADMIN_PASSWORD = "correct horse battery staple"
ENV = ("IOTAUTH_MASTER_KEY", "IOTAUTH_ACCESS_TOKEN_TTL", "IOTAUTH_ADMIN_PASSWORD", "IOTAUTH_DATA_DIR")
DEVICES = {
    "thermo-1": ("write:temperature device:power", "Living-room thermostat"),
    "panel-1": ("read:temperature control:power", "Hall wall panel"),
    "lamp-1": ("device:power", "Desk lamp"),
    "lamp-2": ("device:power", "Bedside lamp"),
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=float(int(time.time())))


@pytest.fixture(scope="session")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `iotauth init` per run (its argon2 hash costs ~0.2 s); each test gets a copy of it."""
    root = tmp_path_factory.mktemp("init")
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV:
            mp.delenv(name, raising=False)
        mp.setenv("IOTAUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        init_data_dir(load_settings(root / "data"), force=False, now=time.time())
    return root


@pytest.fixture
def data_dir(initialised: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real initialised data dir of this test's own (database, and the master key file beside it)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    shutil.copytree(initialised, tmp_path / "copy")
    return tmp_path / "copy" / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return load_settings(data_dir).with_ports(mqtt_port=0, http_port=0)


class ServerThread:
    """`running()` in its own event loop thread, as `iotauth serve` would run it."""

    def __init__(self, settings: Settings, clock: FakeClock, broker_cls: type[Any] = HardenedBroker) -> None:
        self.settings = settings
        self.broker_cls = broker_cls
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.run: Running | None = None
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with running(self.settings, self.clock, self.broker_cls) as run:
                self.run = run
                self.ready.set()
                await self._stop.wait()
        except BaseException as exc:  # surfaced to the test
            self.error = exc
            self.ready.set()

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(15), "server did not start"
        if self.error:
            raise self.error
        return self

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run fn in the server's loop thread (the service's SQLite connection belongs to it)."""
        async def wrapper() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    @property
    def service(self) -> Any:
        assert self.run is not None
        return self.run.service

    @property
    def mqtt_port(self) -> int:
        assert self.run is not None
        return self.run.mqtt_port

    @property
    def http_url(self) -> str:
        assert self.run is not None
        return f"http://127.0.0.1:{self.run.http_port}"

    def register(self, client_id: str, scope: str, name: str | None = None) -> None:
        self.call(self.service.register_client, client_id, scope, name, self.clock.now())

    def approve(self, user_code: str, user: str = "admin", approve: bool = True) -> Any:
        return self.call(self.service.decide, user_code, user, approve, self.clock.now())

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)


def start_server(settings: Settings, clock: FakeClock, config: str = "",
                 broker_cls: type[Any] = HardenedBroker) -> ServerThread:
    """The real server with the test devices registered; `config` is written to <data dir>/iotauth.toml.

    `broker_cls=amqtt.broker.Broker` runs the same server on amqtt's stock broker class."""
    if config:
        (settings.data_dir / "iotauth.toml").write_text(config)
        settings = load_settings(settings.data_dir).with_ports(mqtt_port=0, http_port=0)
    srv = ServerThread(settings, clock, broker_cls).start()
    for client_id, (scope, name) in DEVICES.items():
        if srv.call(srv.service.store.client, client_id) is None:  # a restart finds them registered
            srv.register(client_id, scope, name)
    return srv


@pytest.fixture
def server(settings: Settings, clock: FakeClock) -> Iterator[ServerThread]:
    srv = start_server(settings, clock)
    yield srv
    srv.stop()


@pytest.fixture
def svc(settings: Settings, clock: FakeClock) -> Iterator[Any]:
    """The real service on a real data dir, no transports, with the test devices registered."""
    service = open_service(settings)
    for client_id, (scope, name) in DEVICES.items():
        service.register_client(client_id, scope, name, clock.now())
    yield service
    service.store.close()


def wire_reply(service: Any, endpoint: str, params: dict[str, Any], now: float) -> dict[str, Any]:
    """The service's answer as the wire sees it: the success body or the error object."""
    try:
        return service.handle(endpoint, params, now)
    except OAuthError as exc:
        return exc.to_wire()
