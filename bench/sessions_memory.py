"""Benchmark 4: live sessions: broker memory with 100, 1,000 and 2,000 authenticated idle sessions, and
whether the time to connect one more session stays flat as the count grows.

Each session is a device with its own key and access token, connected one after another (CONNECT with a
fresh DPoP proof, wait for CONNACK) and then left idle (keep-alive 600 s). The broker's resident memory
(RSS of its process) is read after each level, once it has settled. Stock amqtt 0.12.1 (anonymous auth
only) holds the same sessions in the same run, for scale.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from bench.common import (
    Credentials,
    Loop,
    Report,
    Server,
    arguments,
    bench_data,
    connack_code,
    connect_password,
    median,
)

SCOPE = "write:temperature device:power"
KEEPALIVE = 600
BAND = 100  # connect times are compared over the last BAND sessions of each level (10 in a smoke run)


def hold_sessions(
    server: Server, creds: list[Credentials], audience: str, levels: list[int], band: int, settle: float
) -> dict[str, Any]:
    loop = Loop()
    connack: dict[str, int] = {}
    times: list[float] = []
    rss = {0: server.rss()}

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any = None) -> None:
        connack[c._client_id.decode()] = connack_code(reason)

    try:
        for level in levels:
            for cred in creds[len(times) : level]:
                c = loop.client(
                    cred.client_id,
                    username=cred.client_id,
                    password=connect_password(cred, audience),
                    keepalive=KEEPALIVE,
                )
                c.on_connect = on_connect
                start = time.perf_counter()
                loop.connect(c, server.port)
                if not loop.run_until(lambda cid=cred.client_id: cid in connack, 30):
                    raise RuntimeError(f"{server.kind}: no CONNACK for {cred.client_id}")
                times.append(time.perf_counter() - start)
            loop.run_for(settle)  # let the broker settle (and its sweeps run) before reading its memory
            rss[level] = server.rss()
        refused = sum(1 for code in connack.values() if code != 0)
        return {
            "rss_mb": {n: v / 2**20 for n, v in rss.items()},
            "connect_ms_last_band": {n: median(times[n - band : n]) * 1000 for n in levels},
            "connect_ms_first_band": median(times[:band]) * 1000,
            "refused": refused,
        }
    finally:
        loop.close_all()
        gc.collect()


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    levels = [10, 20, 40] if args.smoke else [100, 1000, 2000]
    band = 10 if args.smoke else BAND
    settle = 0.2 if args.smoke else 2.0
    report = Report("sessions_memory", args)
    report.parameters = {
        "levels": levels,
        "keepalive_s": KEEPALIVE,
        "scope": SCOPE,
        "connect_band": band,
        "baseline_broker": "amqtt 0.12.1 Broker, plugins: AnonymousAuthPlugin only",
    }
    most = max(levels)
    with bench_data() as data:
        creds = data.mint((f"bench-dev-{i:04d}", SCOPE) for i in range(most))
        audience = data.settings.audience
        with Server("iotauth", data.dir.parent, data, profile=args.profile, what_if=args.what_if) as ours:
            mine = hold_sessions(ours, creds, audience, levels, band, settle)
        with Server("amqtt", data.dir.parent) as plain:
            theirs = hold_sessions(plain, creds, audience, levels, band, settle)
    report.figure("iotauth", mine, label="iotauth serve")
    report.figure("rss_mb_0", mine["rss_mb"][0], label="  RSS with no session", unit="MB")
    for n in levels[:-1]:
        report.figure(f"rss_mb_{n}", mine["rss_mb"][n], label=f"  RSS with {n} sessions", unit="MB")
    report.target(
        f"rss_mb_{most}", mine["rss_mb"][most], "<", 300, label=f"  RSS with {most} sessions", unit="MB"
    )
    per_session = (mine["rss_mb"][most] - mine["rss_mb"][0]) * 1024 / most
    report.figure("kb_per_session", per_session, label="  memory per session", unit="KB")
    for n in levels:
        report.figure(
            f"connect_ms_at_{n}",
            mine["connect_ms_last_band"][n],
            label=f"  connect time, median of sessions {n - band + 1}-{n}",
            unit="ms",
        )
    flat = mine["connect_ms_last_band"][most] / mine["connect_ms_first_band"]
    report.target(
        "connect_time_growth",
        flat,
        "<=",
        1.5,
        label=f"  connect time at {most} / at the first {band} (flat)",
        unit="x",
    )
    report.figure("amqtt", theirs, label="stock amqtt (anonymous auth only), same sessions")
    report.figure("amqtt_rss_mb_most", theirs["rss_mb"][most], label=f"  RSS with {most} sessions", unit="MB")
    plain_per_session = (theirs["rss_mb"][most] - theirs["rss_mb"][0]) * 1024 / most
    report.figure("amqtt_kb_per_session", plain_per_session, label="  memory per session", unit="KB")
    report.figure(
        "amqtt_connect_ms_at_most",
        theirs["connect_ms_last_band"][most],
        label=f"  connect time, median of sessions {most - band + 1}-{most}",
        unit="ms",
    )
    report.figure(
        "memory_per_session_vs_amqtt",
        per_session / plain_per_session,
        label="memory per session, iotauth / amqtt",
        unit="x",
    )
    if mine["refused"] or theirs["refused"]:
        report.note(f"refused CONNECTs: iotauth {mine['refused']}, amqtt {theirs['refused']}")
    report.write()


if __name__ == "__main__":
    main()
