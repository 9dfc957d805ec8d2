"""Benchmark 5: revocation and expiry: how long a live session outlives its grant or its token.

Revocation: 100 devices hold authenticated sessions on `iotauth serve`; each is revoked with the real
command, `iotauth revoke --client ID`, a separate process as an owner would run it, one at a time.
For each session: the time from the revocation's commit (the `at` the command records in the
revocations table, read back afterwards) to the client seeing its socket closed, and from the start of
the command (which includes starting Python) to the same moment.

Expiry: 100 devices connect with access tokens from a data dir whose `[tokens] access_ttl` is short;
for each session, the time from its token's `exp` to the client seeing its socket closed.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    REPO,
    Credentials,
    Loop,
    Report,
    Server,
    arguments,
    bench_data,
    connack_code,
    connect_password,
    percentile,
)

SCOPE = "write:temperature device:power"
PARALLEL_COMMANDS = 1  # one at a time, as an owner runs them


class Sessions:
    """Authenticated paho sessions that note (wall clock) when the server closes each socket."""

    def __init__(self, server: Server, creds: list[Credentials], audience: str) -> None:
        self.loop = Loop()
        self.connack: dict[str, int] = {}
        self.closed: dict[str, float] = {}
        for cred in creds:
            c = self.loop.client(
                cred.client_id,
                username=cred.client_id,
                password=connect_password(cred, audience),
                keepalive=600,
            )
            c.on_connect = self._on_connect
            c.on_disconnect = self._on_disconnect
            self.loop.connect(c, server.port)
        if not self.loop.run_until(lambda: len(self.connack) == len(creds), 60):
            raise RuntimeError("sessions did not connect")
        refused = [cid for cid, code in self.connack.items() if code != 0]
        if refused:
            raise RuntimeError(f"CONNECT refused for {refused[:3]}")

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any = None) -> None:
        self.connack[c._client_id.decode()] = connack_code(reason)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any = None) -> None:
        self.closed.setdefault(c._client_id.decode(), time.time())


def revoke_all(data: Any, server: Server, creds: list[Credentials], what_if: str | None) -> dict[str, Any]:
    audience = data.settings.audience
    sessions = Sessions(server, creds, audience)
    loop = sessions.loop
    todo = [c.client_id for c in creds]
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    started: dict[str, float] = {}
    failed: list[str] = []
    while todo or running:
        while todo and len(running) < PARALLEL_COMMANDS:
            cid = todo.pop(0)
            started[cid] = time.time()
            entry = ["bench.what_if", what_if] if what_if else ["authsvc"]
            argv = [sys.executable, "-m", *entry, "--data-dir", str(data.dir), "revoke", "--client", cid]
            running.append(
                (
                    cid,
                    subprocess.Popen(
                        argv, env=data.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    ),
                )
            )
        loop.step(0.005)
        for cid, proc in list(running):
            if proc.poll() is not None:
                running.remove((cid, proc))
                if proc.returncode != 0:
                    failed.append(f"{cid}: {proc.stderr.read().decode().strip() if proc.stderr else ''}")
    loop.run_until(lambda: len(sessions.closed) == len(creds), 10)
    with sqlite3.connect(f"file:{data.settings.db_path}?mode=ro", uri=True) as db:
        committed = dict(
            db.execute("SELECT client_id, MAX(at) FROM revocations GROUP BY client_id").fetchall()
        )
    loop.close_all()
    from_commit = [sessions.closed[c] - committed[c] for c in sessions.closed if c in committed]
    from_command = [sessions.closed[c] - started[c] for c in sessions.closed]
    return {
        "sessions": len(creds),
        "closed": len(sessions.closed),
        "failed_commands": failed,
        "from_commit_ms": _summary(from_commit),
        "from_command_start_ms": _summary(from_command),
    }


def expire_all(server: Server, creds: list[Credentials], audience: str) -> dict[str, Any]:
    sessions = Sessions(server, creds, audience)
    exp = {c.client_id: c.exp for c in creds}
    last = max(exp.values())
    wait = last - time.time() + 5
    sessions.loop.run_until(lambda: len(sessions.closed) == len(creds), max(wait, 1))
    early = [c for c, t in sessions.closed.items() if t < exp[c]]
    sessions.loop.close_all()
    after_exp = [sessions.closed[c] - exp[c] for c in sessions.closed]
    return {
        "sessions": len(creds),
        "closed": len(sessions.closed),
        "closed_before_exp": len(early),
        "from_exp_ms": _summary(after_exp),
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else float("nan"),
        "min": min(ms) if ms else float("nan"),
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    count = 2 if args.smoke else 100
    ttl = 2 if args.smoke else 15
    report = Report("revocation", args)
    report.parameters = {
        "sessions": count,
        "parallel_revoke_commands": PARALLEL_COMMANDS,
        "access_ttl_s": ttl,
        "scope": SCOPE,
    }
    with bench_data() as data:
        creds = data.mint((f"bench-dev-{i:03d}", SCOPE) for i in range(count))
        with Server("iotauth", data.dir.parent, data, profile=args.profile, what_if=args.what_if) as server:
            revoked = revoke_all(data, server, creds, args.what_if)
    with (
        bench_data({"tokens": {"access_ttl": ttl}}) as data,
        Server("iotauth", data.dir.parent, data, what_if=args.what_if) as server,
    ):
        creds = data.mint((f"bench-dev-{i:03d}", SCOPE) for i in range(count))  # exp = now + ttl
        expired = expire_all(server, creds, data.settings.audience)
    report.figure("revocation", revoked, label=f"revocation: {revoked['closed']} of {count} sessions closed")
    report.figure(
        "revoke_commit_p50_ms", revoked["from_commit_ms"]["p50"], label="  commit to close, p50", unit="ms"
    )
    report.target(
        "revoke_commit_p99_ms",
        revoked["from_commit_ms"]["p99"],
        "<=",
        1000,
        label="  commit to close, p99",
        unit="ms",
    )
    report.figure(
        "revoke_command_p50_ms",
        revoked["from_command_start_ms"]["p50"],
        label="  command start to close, p50",
        unit="ms",
    )
    report.target(
        "revoke_command_p99_ms",
        revoked["from_command_start_ms"]["p99"],
        "<=",
        1000,
        label="  command start to close, p99",
        unit="ms",
    )
    report.figure("expiry", expired, label=f"expiry: {expired['closed']} of {count} sessions closed")
    report.figure("expiry_p50_ms", expired["from_exp_ms"]["p50"], label="  exp to close, p50", unit="ms")
    report.target(
        "expiry_p99_ms", expired["from_exp_ms"]["p99"], "<=", 1000, label="  exp to close, p99", unit="ms"
    )
    if revoked["closed"] < count or expired["closed"] < count or revoked["failed_commands"]:
        report.note(f"not every session closed, or a command failed: {revoked['failed_commands'][:3]}")
    if expired["closed_before_exp"]:
        report.note(f"{expired['closed_before_exp']} session(s) closed before their exp")
    report.write()


if __name__ == "__main__":
    main()
