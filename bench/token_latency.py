"""Benchmark 1: token response time over MQTT, request publish to reply received (p50, p99).

1, 10 and 100 simulated devices poll `oauth/v1/token` with the device-code grant (RFC 8628 3.4) while
their codes await approval, so every poll is a full request: envelope, client lookup, DPoP proof
verification with the server nonce, device-code lookup and the counted poll (kept in the serving process),
then the `authorization_pending` reply. Each device polls every interval (the data dir sets
tokens.poll_interval = 1 s, five times the default rate, plus a 10 % margin so no poll earns
`slow_down`), from a random phase, over its own bootstrap session, as a real device would.

A second figure, not a target: a burst where all 100 devices poll at the same instant.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections import Counter
from typing import Any

from joserfc.jwk import ECKey

from bench.common import (
    DEVICE_CODE_GRANT,
    PREFIX,
    Loop,
    Report,
    Server,
    arguments,
    bench_data,
    make_proof,
    percentile,
)

TOKEN_TOPIC = f"{PREFIX}/token"
POLL_INTERVAL = 1  # seconds, tokens.poll_interval in the bench data dir
PERIOD = POLL_INTERVAL * 1.1


class Poller:
    """One device: a bootstrap session, its reply topic, a pending device code, and its polls."""

    def __init__(self, loop: Loop, index: int) -> None:
        self.loop = loop
        self.client_id = f"bench-dev-{index:03d}"
        self.key = ECKey.generate_key("P-256", private=True)
        self.jwk = self.key.as_dict(private=False)
        self.reply_to = f"{PREFIX}/reply/{secrets.token_urlsafe(18)}"
        self.mqtt = loop.client(f"bench-boot-{index:03d}")
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message
        self.connack: int | None = None
        self.subscribed = False
        self.nonce: str | None = None
        self.device_code: str | None = None
        self.period = PERIOD
        self.payloads: list[bytes] = []
        self.outstanding: str | None = None  # correlation id of the poll awaiting its reply
        self.sent_at = 0.0
        self.late = False
        self.end = 0.0
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any = None) -> None:
        self.connack = 0 if not reason.is_failure else 1
        c.subscribe(self.reply_to, qos=1)

    def _on_subscribe(self, *args: Any) -> None:
        self.subscribed = True

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        now = time.perf_counter()
        reply = json.loads(msg.payload)
        self.nonce = reply.get("dpop_nonce", self.nonce)
        if "device_code" in reply:
            self.device_code = reply["device_code"]
            return
        if reply.get("correlation_id") != self.outstanding:
            self.outcomes["unmatched"] += 1
            return
        self.latencies.append(now - self.sent_at)
        self.outstanding = None
        error = reply.get("error", "tokens")
        self.outcomes[error] += 1
        if error == "slow_down":  # RFC 8628 3.5: the interval grows by 5 s
            self.period += 5
        if self.late and now < self.end:
            self.late = False
            self.send()

    def authorize(self) -> None:
        body = {
            "reply_to": self.reply_to,
            "client_id": self.client_id,
            "dpop": make_proof(self.key, self.jwk, "PUBLISH", f"{PREFIX}/device_authorization"),
        }
        self.mqtt.publish(f"{PREFIX}/device_authorization", json.dumps(body), qos=1)

    def prepare(self, polls: int) -> None:
        """Every poll's payload made in advance, so proof signing never delays a timestamp."""
        self.payloads = []
        for k in range(polls):
            body = {
                "reply_to": self.reply_to,
                "correlation_id": f"{k}",
                "client_id": self.client_id,
                "grant_type": DEVICE_CODE_GRANT,
                "device_code": self.device_code,
                "dpop": make_proof(self.key, self.jwk, "PUBLISH", TOKEN_TOPIC, nonce=self.nonce),
            }
            self.payloads.append(json.dumps(body).encode())
        self.payloads.reverse()

    def send(self) -> None:
        if self.outstanding is not None:
            self.late = True  # send when the reply arrives
            return
        if not self.payloads:
            return
        payload = self.payloads.pop()
        self.outstanding = json.loads(payload)["correlation_id"]
        self.sent_at = time.perf_counter()
        self.mqtt.publish(TOKEN_TOPIC, payload, qos=1)
        next_at = self.sent_at + self.period
        if next_at < self.end:
            self.loop.call_at(next_at, self.send)


def run_level(loop: Loop, devices: list[Poller], seconds: float, server: Server) -> dict[str, Any]:
    polls = int(seconds / PERIOD) + 2
    for d in devices:
        d.prepare(polls)
        d.latencies, d.outcomes, d.late, d.outstanding = [], Counter(), False, None
    start = time.perf_counter() + 0.2
    cpu0, wall0 = server.cpu(), time.perf_counter()
    for d in devices:
        d.end = start + seconds
        loop.call_at(start + random.uniform(0, PERIOD), d.send)
    loop.run_until(
        lambda: time.perf_counter() > start + seconds and all(d.outstanding is None for d in devices),
        seconds + 30,
    )
    cpu, wall = server.cpu() - cpu0, time.perf_counter() - wall0
    latencies = [x for d in devices for x in d.latencies]
    outcomes = sum((d.outcomes for d in devices), Counter())
    return {
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "requests_per_s": len(latencies) / seconds,
        "server_cpu_percent": 100 * cpu / wall,
        "outcomes": dict(outcomes),
    }


def run_burst(loop: Loop, devices: list[Poller], rounds: int) -> dict[str, Any]:
    for d in devices:
        d.prepare(rounds)
        d.latencies, d.outcomes, d.late, d.outstanding = [], Counter(), False, None
        d.end = 0.0  # no self-scheduling: each round is started below
    for _ in range(rounds):
        for d in devices:
            d.send()
        loop.run_until(lambda: all(d.outstanding is None for d in devices), 30)
        # the next round a full period after this one's last reply: no poll comes sooner than the interval
        loop.run_for(PERIOD)
    latencies = [x for d in devices for x in d.latencies]
    return {
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    levels = [1, 3] if args.smoke else [1, 10, 100]
    seconds = {1: 1.0, 3: 1.0} if args.smoke else {1: 40.0, 10: 25.0, 100: 25.0}
    burst_rounds = 1 if args.smoke else 5
    report = Report("token_latency", args)
    report.parameters = {
        "devices": levels,
        "seconds_per_level": seconds,
        "poll_interval_s": POLL_INTERVAL,
        "poll_period_s": PERIOD,
        "burst_rounds": burst_rounds,
        "request_qos": 1,
        "grant": "device_code, pending (authorization_pending)",
        "dpop": "ES256 with server nonce",
    }
    most = max(levels)
    with bench_data({"tokens": {"poll_interval": POLL_INTERVAL}}) as data:
        data.register((f"bench-dev-{i:03d}", "read:temperature") for i in range(most))
        with Server("iotauth", data.dir.parent, data, profile=args.profile, what_if=args.what_if) as server:
            loop = Loop()
            devices = [Poller(loop, i) for i in range(most)]
            for d in devices:
                loop.connect(d.mqtt, server.port)
            if not loop.run_until(lambda: all(d.subscribed for d in devices), 60):
                raise RuntimeError("bootstrap sessions did not connect and subscribe")
            for d in devices:
                d.authorize()
            if not loop.run_until(lambda: all(d.device_code for d in devices), 60):
                raise RuntimeError("device authorization requests were not answered")
            results = {}
            for n in levels:
                results[n] = run_level(loop, devices[:n], seconds[n], server)
                r = results[n]
                report.figure(
                    f"devices_{n}",
                    r,
                    label=f"{n} device(s): samples {r['samples']}, "
                    f"{r['requests_per_s']:.0f} req/s, server CPU {r['server_cpu_percent']:.0f} %",
                )
                report.figure(f"p50_ms_{n}", r["p50_ms"], label=f"  p50 at {n}", unit="ms")
                if n != most:
                    report.figure(f"p99_ms_{n}", r["p99_ms"], label=f"  p99 at {n}", unit="ms")
            report.target(
                f"p99_ms_{most}", results[most]["p99_ms"], "<=", 10, label=f"  p99 at {most}", unit="ms"
            )
            burst = run_burst(loop, devices, burst_rounds)
            report.figure(
                "burst", burst, label=f"burst: {most} polls at one instant, {burst['samples']} samples"
            )
            report.figure("burst_p50_ms", burst["p50_ms"], label="  burst p50", unit="ms")
            report.figure("burst_p99_ms", burst["p99_ms"], label="  burst p99", unit="ms")
            loop.close_all()
    outcomes = Counter()
    for r in results.values():
        outcomes.update(r["outcomes"])
    if set(outcomes) - {"authorization_pending"}:
        report.note(f"replies other than authorization_pending: {dict(outcomes)}")
    if levels[0] == 1 and results[1]["samples"] < 100:
        report.note("p99 of fewer than 100 samples is their maximum")
    report.write()


if __name__ == "__main__":
    main()
