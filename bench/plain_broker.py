"""The baseline: stock amqtt 0.12.1 on a free loopback port, in its own process.

amqtt 0.12.1 with no plugins at all refuses every CONNECT (Broker._authenticate: "no plugin responded
with a boolean", CONNACK 5), so the baseline loads the one plugin it cannot run without: amqtt's own
AnonymousAuthPlugin, which admits everyone. No topic plugin, no loggers, no $SYS.
Prints "MQTT on 127.0.0.1:PORT" once listening; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from amqtt.broker import Broker

CONFIG = {
    "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(CONFIG)
    await broker.start()
    port = broker._servers["default"].instance.sockets[0].getsockname()[1]
    print(f"MQTT on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
