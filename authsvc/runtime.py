"""`iotauth serve`: one process, one asyncio loop: the broker, the service and the HTTP side."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any

import uvicorn

from authsvc.clock import Clock, SystemClock
from authsvc.config import Settings
from authsvc.datadir import open_service
from authsvc.service import AuthService
from authsvc.web.app import create_app
from broker.gate import Gate
from broker.server import HardenedBroker, bound_port, start_broker

log = logging.getLogger("iotauth")

MAINTENANCE_SECONDS = 60
SERVE_BUSY_TIMEOUT = 0.25  # seconds


def _lock_data_dir(settings: Settings) -> IO[bytes]:
    """One `serve` per data dir: replay protection and session control live in the serving process."""
    path = settings.data_dir / "serve.lock"
    try:
        handle = open(path, "ab")  # noqa: SIM115 - held open for the life of the server
    except OSError as exc:
        raise OSError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OSError(f"another iotauth serve is already running on {settings.data_dir}") from None
    return handle


@dataclass
class Running:
    service: AuthService
    broker: HardenedBroker
    gate: Gate
    http: uvicorn.Server
    mqtt_port: int
    http_port: int


def _bind_http(host: str, port: int) -> socket.socket:
    """Bind first, so the issuer can follow the real port even when port 0 picks a free one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {(exc.strerror or str(exc)).lower()}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _start_http(service: AuthService, clock: Clock, sock: socket.socket) -> tuple[uvicorn.Server, asyncio.Task]:
    app = create_app(service, clock)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise OSError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    return server, task


@contextlib.asynccontextmanager
async def running(settings: Settings, clock: Clock | None = None,
                  broker_cls: type[Any] = HardenedBroker) -> AsyncIterator[Running]:
    """Start everything on the configured listeners (port 0 picks a free one); stop it all on exit.

    `broker_cls` exists for the tests that show each hardening fails on amqtt's stock `Broker`."""
    clock = clock or SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_lock_data_dir(settings))
        sock = stack.enter_context(_bind_http(settings.http_host, settings.http_port))
        http_port = sock.getsockname()[1]
        service = open_service(settings.with_ports(http_port=http_port))
        stack.callback(service.store.close)
        # The broker and the service share this loop: a write waits at most this long for another process
        service.store.set_busy_timeout(SERVE_BUSY_TIMEOUT)
        broker, gate = await start_broker(service, clock, settings.mqtt_host, settings.mqtt_port, broker_cls)
        stack.push_async_callback(_stop_broker, broker, gate)
        http, http_task = await _start_http(service, clock, sock)
        stack.push_async_callback(_stop_http, http, http_task)
        maintenance = asyncio.create_task(_maintain(service, clock))
        stack.callback(maintenance.cancel)
        yield Running(service, broker, gate, http, bound_port(broker), http_port)


async def _stop_http(http: uvicorn.Server, task: asyncio.Task[None]) -> None:
    http.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)


async def _stop_broker(broker: HardenedBroker, gate: Gate) -> None:
    await gate.stop()
    with contextlib.suppress(Exception):
        await broker.shutdown()


async def _maintain(service: AuthService, clock: Clock) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_SECONDS)
        try:
            service.maintenance(clock.now())
        except Exception:
            log.exception("maintenance failed")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings) as run:
        log.info("MQTT on %s:%d, HTTP on http://%s:%d (issuer %s)", settings.mqtt_host, run.mqtt_port,
                 settings.http_host, run.http_port, run.service.settings.issuer)
        await stop.wait()
        log.info("stopping")
