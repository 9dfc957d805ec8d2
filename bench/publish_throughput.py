"""Benchmark 3: publish throughput, one publisher to one subscriber, QoS 0 and QoS 1.

Our broker (`iotauth serve`: HardenedBroker with its plugin, both clients authenticated devices whose
scopes allow the topic, so every PUBLISH and every delivery passes the ACL) against stock amqtt 0.12.1
with only its anonymous-auth plugin, both in processes of their own and running side by side, in
alternating rounds. The publisher keeps at most WINDOW messages in flight (published, not yet received
by the subscriber), so neither broker is measured on how much it can buffer. Throughput is messages
received per second, first publish to last delivery; the broker's CPU per message comes with it.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    Credentials,
    Loop,
    Report,
    Server,
    arguments,
    bench_data,
    connect_password,
    median,
)

WINDOW = 100
TOPIC = "home/bench-pub/temperature"
FILTER = "home/+/temperature"


class Stream:
    def __init__(self, server: Server, pub: Credentials, sub: Credentials, audience: str, qos: int) -> None:
        self.loop = Loop()
        self.qos = qos
        self.received = 0
        self.last = 0.0
        self.subscribed = False
        self.connected: set[str] = set()
        self.sub = self.loop.client(
            sub.client_id, username=sub.client_id, password=connect_password(sub, audience)
        )
        self.pub = self.loop.client(
            pub.client_id, username=pub.client_id, password=connect_password(pub, audience)
        )
        for c in (self.sub, self.pub):
            c.on_connect = self._on_connect
        self.sub.on_subscribe = lambda *a: setattr(self, "subscribed", True)
        self.sub.on_message = self._on_message
        self.loop.connect(self.sub, server.port)
        self.loop.connect(self.pub, server.port)
        if not self.loop.run_until(lambda: len(self.connected) == 2, 20):
            raise RuntimeError(f"{server.kind}: publisher and subscriber did not connect")
        self.sub.subscribe(FILTER, qos=qos)
        if not self.loop.run_until(lambda: self.subscribed, 20):
            raise RuntimeError(f"{server.kind}: no SUBACK")

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if not reason.is_failure:
            self.connected.add(c._client_id.decode())

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        self.received += 1
        self.last = time.perf_counter()

    def run(self, count: int) -> float:
        payload = b'{"celsius": 21.5, "seq": 0000000}'
        sent = 0
        start = time.perf_counter()
        deadline = start + 120
        while self.received < count and time.perf_counter() < deadline:
            while sent < count and sent - self.received < WINDOW:
                self.pub.publish(TOPIC, payload, qos=self.qos)
                sent += 1
            self.loop.step(0.01)
        if self.received < count:
            raise RuntimeError(f"only {self.received} of {count} messages arrived")
        return self.last - start

    def close(self) -> None:
        self.loop.close_all()


def measure(server: Server, creds: list[Credentials], audience: str, qos: int, count: int) -> dict[str, Any]:
    stream = Stream(server, creds[0], creds[1], audience, qos)
    try:
        stream.run(min(count // 10, 500))  # warm-up
        stream.received = 0
        cpu0, client0 = server.cpu(), time.process_time()
        seconds = stream.run(count)
        cpu, client = server.cpu() - cpu0, time.process_time() - client0
    finally:
        stream.close()
    return {
        "messages": count,
        "seconds": seconds,
        "per_s": count / seconds,
        "server_cpu_us_per_msg": cpu / count * 1e6,
        "client_cpu_us_per_msg": client / count * 1e6,
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    counts = {0: 300, 1: 200} if args.smoke else {0: 15000, 1: 8000}
    rounds = 1 if args.smoke else 3
    report = Report("publish_throughput", args)
    report.parameters = {
        "messages": counts,
        "rounds": rounds,
        "window": WINDOW,
        "topic": TOPIC,
        "filter": FILTER,
        "payload_bytes": 33,
        "baseline_broker": "amqtt 0.12.1 Broker, plugins: AnonymousAuthPlugin only",
    }
    with bench_data() as data:
        creds = data.mint([("bench-pub", "write:temperature"), ("bench-sub", "read:temperature")])
        audience = data.settings.audience
        log_dir = data.dir.parent
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            0: {"iotauth": [], "amqtt": []},
            1: {"iotauth": [], "amqtt": []},
        }
        with (
            Server("iotauth", log_dir, data, profile=args.profile, what_if=args.what_if) as ours,
            Server("amqtt", log_dir) as plain,
        ):
            for r in range(rounds):
                for qos in (0, 1):
                    order = [("iotauth", ours), ("amqtt", plain)]
                    for name, server in order if r % 2 == 0 else reversed(order):
                        runs[qos][name].append(measure(server, creds, audience, qos, counts[qos]))
    for qos in (0, 1):
        ours_runs, plain_runs = runs[qos]["iotauth"], runs[qos]["amqtt"]
        ratios = [o["per_s"] / p["per_s"] for o, p in zip(ours_runs, plain_runs, strict=True)]
        report.figure(
            f"qos{qos}_rounds", runs[qos], label=f"QoS {qos}: {rounds} round(s) of {counts[qos]} messages"
        )
        report.figure(
            f"qos{qos}_iotauth_per_s",
            median([o["per_s"] for o in ours_runs]),
            label="  iotauth serve",
            unit="msg/s",
        )
        report.figure(
            f"qos{qos}_amqtt_per_s",
            median([p["per_s"] for p in plain_runs]),
            label="  stock amqtt (anonymous auth only)",
            unit="msg/s",
        )
        report.figure(
            f"qos{qos}_iotauth_cpu_us_per_msg",
            median([o["server_cpu_us_per_msg"] for o in ours_runs]),
            label="  broker CPU per message, iotauth",
            unit="us",
        )
        report.figure(
            f"qos{qos}_amqtt_cpu_us_per_msg",
            median([p["server_cpu_us_per_msg"] for p in plain_runs]),
            label="  broker CPU per message, stock amqtt",
            unit="us",
        )
        report.target(
            f"qos{qos}_throughput_vs_amqtt",
            median(ratios),
            ">=",
            0.95,
            label="  throughput ratio, median of rounds",
            unit="x",
        )
    report.write()


if __name__ == "__main__":
    main()
