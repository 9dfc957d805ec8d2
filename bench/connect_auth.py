"""Benchmark 2: CONNECT authentication, its CPU cost and the CONNECT rate it allows.

A. CPU spent in our checks per CONNECT, in this process: what the broker plugin runs for an
   authenticated CONNECT (service.authorize_connect: access token, DPoP proof, jti memory, database
   lookups; then the session ACL is compiled), against two ES256 verifications measured in the same
   run, interleaved in rounds. The baseline is two joserfc JWS verifications (the library the service
   uses, keys already imported: the unit in which the target was set, amqtt-notes.md); bare OpenSSL
   ECDSA verifications are reported beside it. A stage breakdown shows where the rest goes.
B. Authenticated CONNECTs per second (CONNECT, CONNACK, DISCONNECT, close; 8 at a time) against our
   broker (`iotauth serve`, its own process) and stock amqtt 0.12.1 with only its anonymous-auth plugin
   (also its own process), in alternating rounds; both get the very same CONNECT packets, each with a
   fresh DPoP proof. The client sends raw MQTT packets so its own cost stays far below the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from joserfc import jws
from joserfc.jwk import ECKey

from bench.common import (
    DISCONNECT,
    Report,
    Server,
    arguments,
    bench_data,
    connect_packet,
    connect_password,
    median,
)

SCOPE = "read:temperature write:temperature"
CONCURRENCY = 8


# -- A: CPU per check, in process ----------------------------------------------------------------------
def _b64(text: str) -> bytes:
    from authsvc.keys import b64u_decode

    return b64u_decode(text)


def _openssl_job(jwt: str, public_key: Any) -> tuple[bytes, bytes, Any]:
    head, body, sig = jwt.split(".")
    raw = _b64(sig)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{head}.{body}".encode(), der, public_key


def check_cost(data: Any, creds: list[Any], per_round: int, rounds: int) -> dict[str, Any]:
    import authsvc.tokens
    from broker.acl import compile_acl

    with data.service() as svc:
        s = svc.settings
        audience = s.audience
        token_key = ECKey.import_key(svc.keys.active.key.as_dict(private=False))
        device_keys = [ECKey.import_key(c.jwk) for c in creds]
        token_openssl = token_key.raw_value
        totals: Counter[str] = Counter()
        count = 0
        for _ in range(rounds):
            passwords = [
                (creds[i % len(creds)], connect_password(creds[i % len(creds)], audience))
                for i in range(per_round)
            ]
            # the whole check, as the plugin runs it
            t = time.process_time()
            for cred, password in passwords:
                device = svc.authorize_connect(
                    cred.client_id, cred.client_id, password, time.time(), source="127.0.0.1"
                )
                compile_acl(
                    device.scopes, s.scopes, client_id=device.client_id, sub=device.sub, prefix=s.prefix
                )
            totals["check"] += time.process_time() - t
            # two ES256 verifications with joserfc, keys already imported
            pairs = [
                (cred.token, pw.split(" ", 1)[1], device_keys[i % len(creds)])
                for i, (cred, pw) in enumerate(passwords)
            ]
            t = time.process_time()
            for token, proof, key in pairs:
                jws.deserialize_compact(token, token_key, algorithms=["ES256"])
                jws.deserialize_compact(proof, key, algorithms=["ES256"])
            totals["joserfc"] += time.process_time() - t
            # two bare ECDSA P-256 / SHA-256 verifications (OpenSSL through cryptography)
            jobs = [
                (_openssl_job(token, token_openssl), _openssl_job(proof, key.raw_value))
                for token, proof, key in pairs
            ]
            t = time.process_time()
            for (m1, s1, k1), (m2, s2, k2) in jobs:
                k1.verify(s1, m1, ec.ECDSA(hashes.SHA256()))
                k2.verify(s2, m2, ec.ECDSA(hashes.SHA256()))
            totals["openssl"] += time.process_time() - t
            # the same check stage by stage (fresh proofs), to show where the time goes
            staged = [connect_password(cred, audience) for cred, _ in passwords]
            for password in staged:
                token, _, proof = password.partition(" ")
                now = time.time()
                t0 = time.process_time()
                claims = authsvc.tokens.verify_access_token(
                    token, svc.keys.verification_keys(), issuer=s.issuer, audience=audience, now=now
                )
                t1 = time.process_time()
                svc.dpop.verify(
                    proof, htm="CONNECT", htu=audience, now=now, access_token=token, source="127.0.0.1"
                )
                t2 = time.process_time()
                device = svc._live_device(claims, now)
                t3 = time.process_time()
                compile_acl(
                    device.scopes, s.scopes, client_id=device.client_id, sub=device.sub, prefix=s.prefix
                )
                t4 = time.process_time()
                totals["stage_token"] += t1 - t0
                totals["stage_proof"] += t2 - t1
                totals["stage_records"] += t3 - t2
                totals["stage_acl"] += t4 - t3
            count += per_round
    us = {k: v / count * 1e6 for k, v in totals.items()}
    return {
        "check_us": us["check"],
        "two_es256_joserfc_us": us["joserfc"],
        "two_es256_openssl_us": us["openssl"],
        "stages_us": {
            "access token (verify_access_token)": us["stage_token"],
            "DPoP proof (dpop.verify)": us["stage_proof"],
            "token, grant and client records (_live_device)": us["stage_records"],
            "session ACL (compile_acl)": us["stage_acl"],
        },
        "checks": count,
    }


# -- B: CONNECTs per second, end to end --------------------------------------------------------------------
async def _connect_round(port: int, packets: list[bytes]) -> tuple[float, Counter[int]]:
    pending = iter(packets)
    codes: Counter[int] = Counter()

    async def worker() -> None:
        for packet in pending:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(packet)
            connack = await asyncio.wait_for(reader.readexactly(4), 10)
            codes[connack[3]] += 1
            writer.write(DISCONNECT)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(), 10)  # until the server closes its end
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start, codes


def connect_rate(server: Server, packets: list[bytes]) -> dict[str, Any]:
    cpu0 = server.cpu()
    wall, codes = asyncio.run(_connect_round(server.port, packets))
    cpu = server.cpu() - cpu0
    return {
        "connects": len(packets),
        "seconds": wall,
        "per_s": len(packets) / wall,
        "server_cpu_ms_per_connect": cpu / len(packets) * 1000,
        "connack": dict(codes),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    if args.what_if:  # part A runs here: the proposed fix applies to this process too
        from bench.what_if import apply

        apply(args.what_if)
    devices = 10 if args.smoke else 100
    per_round, rounds = (20, 2) if args.smoke else (400, 5)
    connects, rate_rounds = (30, 1) if args.smoke else (600, 3)
    report = Report("connect_auth", args)
    report.parameters = {
        "devices": devices,
        "checks_per_round": per_round,
        "check_rounds": rounds,
        "connects_per_round": connects,
        "rate_rounds_each": rate_rounds,
        "concurrency": CONCURRENCY,
        "scope": SCOPE,
        "baseline_broker": "amqtt 0.12.1 Broker, plugins: AnonymousAuthPlugin only",
    }
    # Part A runs on a data dir of its own: the service it opens here accepts proofs without a nonce, so a
    # server started later on the same data dir would rightly refuse such proofs (dpop.RestartGuard).
    with bench_data() as data:
        creds = data.mint((f"bench-dev-{i:03d}", SCOPE) for i in range(devices))
        a = check_cost(data, creds, per_round, rounds)
    report.figure("in_process", a, label=f"A. CPU per CONNECT check, in process ({a['checks']} checks)")
    report.figure("check_us", a["check_us"], label="  our checks (token, proof, records, ACL)", unit="us")
    report.figure(
        "two_es256_joserfc_us",
        a["two_es256_joserfc_us"],
        label="  two ES256 verifications, joserfc",
        unit="us",
    )
    report.figure(
        "two_es256_openssl_us",
        a["two_es256_openssl_us"],
        label="  two ES256 verifications, bare OpenSSL",
        unit="us",
    )
    for stage, value in a["stages_us"].items():
        report.figure(f"stage: {stage}", value, label=f"    {stage}", unit="us")
    report.target(
        "check_vs_two_es256",
        a["check_us"] / a["two_es256_joserfc_us"],
        "<=",
        1.5,
        label="  ratio to two ES256 verifications (joserfc)",
        unit="x",
    )
    report.figure(
        "check_vs_two_bare_ecdsa",
        a["check_us"] / a["two_es256_openssl_us"],
        label="  ratio to two bare ECDSA verifications",
        unit="x",
    )

    with bench_data() as data:
        creds = data.mint((f"bench-dev-{i:03d}", SCOPE) for i in range(devices))
        log_dir = data.dir.parent
        with (
            Server("iotauth", log_dir, data, profile=args.profile, what_if=args.what_if) as ours,
            Server("amqtt", log_dir) as plain,
        ):
            audience = data.settings.audience
            runs: dict[str, list[dict[str, Any]]] = {"iotauth": [], "amqtt": []}
            for r in range(rate_rounds):
                batch = [
                    connect_packet(c.client_id, c.client_id, connect_password(c, audience))
                    for c in (creds[i % devices] for i in range(connects))
                ]
                order = (
                    [("iotauth", ours), ("amqtt", plain)]
                    if r % 2 == 0
                    else [("amqtt", plain), ("iotauth", ours)]
                )
                for name, server in order:
                    runs[name].append(connect_rate(server, batch))
        ratios = [o["per_s"] / p["per_s"] for o, p in zip(runs["iotauth"], runs["amqtt"], strict=True)]
        ours_rate = median([r["per_s"] for r in runs["iotauth"]])
        plain_rate = median([r["per_s"] for r in runs["amqtt"]])
        report.figure(
            "rate_rounds", runs, label=f"B. CONNECTs per second, {rate_rounds} round(s) of {connects} each"
        )
        report.figure("iotauth_connects_per_s", ours_rate, label="  iotauth serve", unit="/s")
        report.figure(
            "amqtt_connects_per_s", plain_rate, label="  stock amqtt (anonymous auth only)", unit="/s"
        )
        report.figure(
            "iotauth_server_cpu_ms_per_connect",
            median([r["server_cpu_ms_per_connect"] for r in runs["iotauth"]]),
            label="  server CPU per CONNECT, iotauth",
            unit="ms",
        )
        report.figure(
            "amqtt_server_cpu_ms_per_connect",
            median([r["server_cpu_ms_per_connect"] for r in runs["amqtt"]]),
            label="  server CPU per CONNECT, stock amqtt",
            unit="ms",
        )
        report.target(
            "connect_rate_vs_amqtt",
            median(ratios),
            ">=",
            0.70,
            label="  rate ratio, median of rounds",
            unit="x",
        )
        refused = {name: sum((Counter(r["connack"]) for r in rs), Counter()) for name, rs in runs.items()}
        if any(set(c) - {0} for c in refused.values()):
            report.note(f"CONNACK codes other than 0: {refused}")
    report.write()


if __name__ == "__main__":
    main()
