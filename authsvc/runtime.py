"""`iotauth serve`: one process, one asyncio loop: the broker, the service and the HTTP side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
async def running(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Running]:
    """Start everything on the configured listeners (port 0 picks a free one); stop it all on exit."""
    clock = clock or SystemClock()
    sock = _bind_http(settings.http_host, settings.http_port)
    http_port = sock.getsockname()[1]
    service = open_service(settings.with_ports(http_port=http_port))
    broker = gate = http = http_task = None
    try:
        broker, gate = await start_broker(service, clock, settings.mqtt_host, settings.mqtt_port)
        http, http_task = await _start_http(service, clock, sock)
        maintenance = asyncio.create_task(_maintain(service, clock))
        try:
            yield Running(service, broker, gate, http, bound_port(broker), http_port)
        finally:
            maintenance.cancel()
    finally:
        if http is not None and http_task is not None:
            http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, 5)
        sock.close()
        if gate is not None:
            await gate.stop()
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()
        service.store.close()


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
