"""The only module that touches SQLite (through sqlite-utils). Narrow, named verbs.

Secrets never stored in plaintext: device codes and refresh tokens are keyed
hashes (see keys.keyed_hash); signing keys and server secrets are sealed.
WAL mode and a busy timeout let `iotauth approve` write while `serve` runs.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The database cannot be used (missing, corrupt, locked); the message names the file."""


@dataclass(frozen=True)
class DeviceCode:
    code_hash: str
    user_code: str
    client_id: str
    scope: str
    jkt: str | None
    created: float
    expires: float
    interval: int  # as issued; a pending code's polling state is in memory (device_flow.PollMemory)
    status: str  # pending | approved | denied | consumed
    sub: str | None


# Named, not `*`: the table keeps its `last_poll` column (no longer written or read) so that data dirs made
# before the polling state moved to memory and after it share one schema.
_DEVICE_CODE_COLUMNS = "code_hash, user_code, client_id, scope, jkt, created, expires, interval, status, sub"


@dataclass(frozen=True)
class Grant:
    grant_id: str
    client_id: str
    sub: str
    scope: str
    jkt: str
    created: float
    revoked: float | None


@dataclass(frozen=True)
class RefreshToken:
    token_hash: str
    grant_id: str
    jkt: str
    scope: str
    issued: float
    expires: float
    used: float | None
    successor_hash: str | None
    successor_sealed: str | None


@dataclass(frozen=True)
class Revocation:
    id: int
    grant_id: str | None
    client_id: str
    jti: str | None
    reason: str


def _row(cls: type, row: dict[str, Any] | None) -> Any:
    return None if row is None else cls(**row)


class Store:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)

    # -- opening -------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Store:
        if not create and not path.exists():
            raise StoreError(f"{path}: no database here; run `iotauth init` first")
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            store = cls(path, conn)
            if create:
                store._create_schema()
            store._check_schema()
            return store
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot use the database: {exc}") from None

    def close(self) -> None:
        self.conn.close()

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another process's lock before giving up (then: temporarily_unavailable)."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def _create_schema(self) -> None:
        t = self.db
        t["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        t["users"].create({"name": str, "password_hash": str, "created": float}, pk="name", if_not_exists=True)
        t["clients"].create({"client_id": str, "name": str, "scope": str, "created": float},
                            pk="client_id", if_not_exists=True)
        t["signing_keys"].create({"kid": str, "sealed": str, "created": float, "retired": float},
                                 pk="kid", if_not_exists=True)
        t["secrets"].create({"name": str, "sealed": str}, pk="name", if_not_exists=True)
        # last_poll: written by earlier versions only; polling state is in memory now (device_flow.PollMemory)
        t["device_codes"].create(
            {"code_hash": str, "user_code": str, "client_id": str, "scope": str, "jkt": str, "created": float,
             "expires": float, "interval": int, "last_poll": float, "status": str, "sub": str},
            pk="code_hash", if_not_exists=True)
        t["device_codes"].create_index(["user_code"], unique=True, if_not_exists=True)
        t["grants"].create({"grant_id": str, "client_id": str, "sub": str, "scope": str, "jkt": str,
                            "created": float, "revoked": float}, pk="grant_id", if_not_exists=True)
        t["refresh_tokens"].create(
            {"token_hash": str, "grant_id": str, "jkt": str, "scope": str, "issued": float, "expires": float,
             "used": float, "successor_hash": str, "successor_sealed": str},
            pk="token_hash", if_not_exists=True)
        t["access_tokens"].create({"jti": str, "grant_id": str, "client_id": str, "exp": float, "revoked": float},
                                  pk="jti", if_not_exists=True)
        t["revocations"].create({"id": int, "grant_id": str, "client_id": str, "jti": str, "reason": str,
                                 "at": float}, pk="id", if_not_exists=True)
        t["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")

    def _check_schema(self) -> None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not an iotauth database ({exc})") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path}: unexpected schema version {row[0] if row else None!r}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: one writer at a time, across processes too."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    # -- accounts and clients ------------------------------------------------
    def add_user(self, name: str, password_hash: str, now: float) -> None:
        self._write("INSERT OR REPLACE INTO users (name, password_hash, created) VALUES (?, ?, ?)",
                    (name, password_hash, now))

    def password_hash(self, name: str) -> str | None:
        row = self._one("SELECT password_hash FROM users WHERE name = ?", (name,))
        return row["password_hash"] if row else None

    def set_password_hash(self, name: str, password_hash: str) -> None:
        self._write("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name))

    def add_client(self, client_id: str, name: str, scope: str, now: float) -> bool:
        try:
            self._write("INSERT INTO clients (client_id, name, scope, created) VALUES (?, ?, ?, ?)",
                        (client_id, name, scope, now))
        except sqlite3.IntegrityError:
            return False
        return True

    def client(self, client_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM clients WHERE client_id = ?", (client_id,))

    def clients(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM clients ORDER BY client_id")]

    def remove_client(self, client_id: str) -> bool:
        """The client and every device code it was issued: a pending code must not outlive its client."""
        with self.transaction():
            self._write("DELETE FROM device_codes WHERE client_id = ?", (client_id,))
            return self._write("DELETE FROM clients WHERE client_id = ?", (client_id,)) > 0

    def pending_device_codes(self, client_id: str, now: float) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM device_codes WHERE client_id = ? AND status = 'pending'"
                        " AND expires > ?", (client_id, now))
        return int(row["n"]) if row else 0

    # -- keys and secrets ----------------------------------------------------
    def add_signing_key(self, kid: str, sealed: str, created: float) -> None:
        self._write("INSERT INTO signing_keys (kid, sealed, created) VALUES (?, ?, ?)", (kid, sealed, created))

    def signing_keys(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM signing_keys ORDER BY created")]

    def secret(self, name: str) -> str | None:
        row = self._one("SELECT sealed FROM secrets WHERE name = ?", (name,))
        return row["sealed"] if row else None

    def put_secret(self, name: str, sealed: str) -> None:
        self._write("INSERT OR REPLACE INTO secrets (name, sealed) VALUES (?, ?)", (name, sealed))

    # -- key rotation and the master key's source (`iotauth keys rotate`, `iotauth init`) -------
    def rotate_signing_key(self, kid: str, sealed: str, now: float) -> None:
        """Retire the active key and add the new one at once; a new key-set generation tells a running server."""
        with self.transaction():
            self._write("UPDATE signing_keys SET retired = ? WHERE retired IS NULL", (now,))
            self.add_signing_key(kid, sealed, now)
            self._write("INSERT INTO meta (key, value) VALUES ('key_generation', '1') ON CONFLICT (key)"
                        " DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    def drop_retired_signing_keys(self, retired_before: float) -> int:
        return self._write("DELETE FROM signing_keys WHERE retired IS NOT NULL AND retired < ?", (retired_before,))

    def key_generation(self) -> int:
        """Cheap enough to read every sweep: changes only when the key set does."""
        row = self._one("SELECT value FROM meta WHERE key = 'key_generation'")
        return int(row["value"]) if row else 0

    def record_master_key_source(self, source: str, entry: str | None) -> None:
        with self.transaction():
            self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('master_key_source', ?)", (source,))
            self._write("DELETE FROM meta WHERE key = 'master_key_entry'")
            if entry is not None:
                self._write("INSERT INTO meta (key, value) VALUES ('master_key_entry', ?)", (entry,))

    def master_key_source(self) -> tuple[str | None, str | None]:
        """(source, keyring entry) as recorded at `init`; (None, None) for a data dir from before they were."""
        rows = dict(self.conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('master_key_source', 'master_key_entry')").fetchall())
        return rows.get("master_key_source"), rows.get("master_key_entry")

    # -- device codes (RFC 8628) ---------------------------------------------------
    def add_device_code(self, code: DeviceCode) -> bool:
        try:
            self._write(
                f"INSERT INTO device_codes ({_DEVICE_CODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (code.code_hash, code.user_code, code.client_id, code.scope, code.jkt, code.created,
                 code.expires, code.interval, code.status, code.sub))
        except sqlite3.IntegrityError:
            return False  # user code collision: the caller draws another
        return True

    def device_code(self, code_hash: str) -> DeviceCode | None:
        return _row(DeviceCode, self._one(f"SELECT {_DEVICE_CODE_COLUMNS} FROM device_codes WHERE code_hash = ?",
                                          (code_hash,)))

    def device_code_by_user_code(self, user_code: str) -> DeviceCode | None:
        return _row(DeviceCode, self._one(f"SELECT {_DEVICE_CODE_COLUMNS} FROM device_codes WHERE user_code = ?",
                                          (user_code,)))

    def decide(self, user_code: str, status: str, sub: str, now: float) -> bool:
        """Approve or deny once: only a pending, unexpired code changes."""
        return self._write(
            "UPDATE device_codes SET status = ?, sub = ? WHERE user_code = ? AND status = 'pending' AND expires > ?",
            (status, sub, user_code, now)) == 1

    def consume_device_code(self, code_hash: str) -> bool:
        return self._write("UPDATE device_codes SET status = 'consumed' WHERE code_hash = ? AND status = 'approved'",
                           (code_hash,)) == 1

    def purge_device_codes(self, before: float) -> int:
        return self._write("DELETE FROM device_codes WHERE expires < ?", (before,))

    # -- grants and tokens -----------------------------------------------------------
    def add_grant(self, client_id: str, sub: str, scope: str, jkt: str, now: float) -> Grant:
        grant_id = uuid.uuid4().hex
        self._write("INSERT INTO grants (grant_id, client_id, sub, scope, jkt, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (grant_id, client_id, sub, scope, jkt, now))
        return Grant(grant_id, client_id, sub, scope, jkt, now, None)

    def grant(self, grant_id: str) -> Grant | None:
        return _row(Grant, self._one("SELECT * FROM grants WHERE grant_id = ?", (grant_id,)))

    def key_has_live_grant(self, jkt: str) -> bool:
        return self._one("SELECT 1 AS live FROM grants WHERE jkt = ? AND revoked IS NULL LIMIT 1", (jkt,)) is not None

    def live_grants(self, client_id: str | None = None) -> list[Grant]:
        sql, params = "SELECT * FROM grants WHERE revoked IS NULL", ()
        if client_id is not None:
            sql, params = sql + " AND client_id = ?", (client_id,)
        return [Grant(**dict(r)) for r in self.conn.execute(sql + " ORDER BY created", params)]

    def revoke_grant(self, grant_id: str, reason: str, now: float) -> bool:
        with self.transaction():
            grant = self.grant(grant_id)
            if grant is None or grant.revoked is not None:
                return False
            self._write("UPDATE grants SET revoked = ? WHERE grant_id = ?", (now, grant_id))
            self._write("UPDATE refresh_tokens SET successor_sealed = NULL WHERE grant_id = ?", (grant_id,))
            self._write("INSERT INTO revocations (grant_id, client_id, reason, at) VALUES (?, ?, ?, ?)",
                        (grant_id, grant.client_id, reason, now))
        return True

    def add_refresh_token(self, token: RefreshToken) -> None:
        self._write(
            "INSERT INTO refresh_tokens (token_hash, grant_id, jkt, scope, issued, expires, used, successor_hash,"
            " successor_sealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (token.token_hash, token.grant_id, token.jkt, token.scope, token.issued, token.expires, token.used,
             token.successor_hash, token.successor_sealed))

    def refresh_token(self, token_hash: str) -> RefreshToken | None:
        return _row(RefreshToken, self._one("SELECT * FROM refresh_tokens WHERE token_hash = ?", (token_hash,)))

    def mark_rotated(self, token_hash: str, now: float, successor_hash: str, successor_sealed: str) -> bool:
        """Single use: only the first of concurrent refreshes wins."""
        return self._write(
            "UPDATE refresh_tokens SET used = ?, successor_hash = ?, successor_sealed = ?"
            " WHERE token_hash = ? AND used IS NULL", (now, successor_hash, successor_sealed, token_hash)) == 1

    def forget_sealed_successor(self, token_hash: str) -> None:
        self._write("UPDATE refresh_tokens SET successor_sealed = NULL WHERE token_hash = ?", (token_hash,))

    def forget_expired_successors(self, used_before: float) -> int:
        return self._write("UPDATE refresh_tokens SET successor_sealed = NULL"
                           " WHERE successor_sealed IS NOT NULL AND used < ?", (used_before,))

    def add_access_token(self, jti: str, grant_id: str, client_id: str, exp: float) -> None:
        self._write("INSERT INTO access_tokens (jti, grant_id, client_id, exp) VALUES (?, ?, ?, ?)",
                    (jti, grant_id, client_id, exp))

    def access_token(self, jti: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM access_tokens WHERE jti = ?", (jti,))

    def live_access_token(self, jti: str, client_id: str) -> dict[str, Any] | None:
        """The token's record when it, its grant and its client are all live: one query per CONNECT."""
        return self._one(
            "SELECT t.jti, t.grant_id FROM access_tokens t JOIN grants g ON g.grant_id = t.grant_id "
            "JOIN clients c ON c.client_id = t.client_id "
            "WHERE t.jti = ? AND t.client_id = ? AND t.revoked IS NULL AND g.revoked IS NULL", (jti, client_id))

    def revoke_access_token(self, jti: str, now: float) -> bool:
        with self.transaction():
            row = self.access_token(jti)
            if row is None or row["revoked"] is not None:
                return False
            self._write("UPDATE access_tokens SET revoked = ? WHERE jti = ?", (now, jti))
            self._write("INSERT INTO revocations (grant_id, client_id, jti, reason, at) VALUES (?, ?, ?, ?, ?)",
                        (row["grant_id"], row["client_id"], jti, "access token revoked", now))
        return True

    def purge_access_tokens(self, before: float) -> int:
        return self._write("DELETE FROM access_tokens WHERE exp < ?", (before,))

    # -- DPoP replay across restarts (authsvc.dpop.RestartGuard) ----------------------
    def no_nonce_horizon(self) -> float:
        """Until when an earlier process may have accepted a DPoP proof without a nonce (0: never)."""
        row = self._one("SELECT value FROM meta WHERE key = 'dpop_no_nonce_horizon'")
        return float(row["value"]) if row else 0.0

    def raise_no_nonce_horizon(self, until: float) -> None:
        """Only ever moves later, so no process can shorten what another recorded."""
        self._write("INSERT INTO meta (key, value) VALUES ('dpop_no_nonce_horizon', ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = excluded.value WHERE CAST(value AS REAL) < CAST(excluded.value AS REAL)",
                    (repr(float(until)),))

    # -- revocation feed (read by the running server to close live sessions) ---------
    def revocations_after(self, last_id: int) -> list[Revocation]:
        rows = self.conn.execute(
            "SELECT id, grant_id, client_id, jti, reason FROM revocations WHERE id > ? ORDER BY id", (last_id,))
        return [Revocation(**dict(r)) for r in rows]

    def last_revocation_id(self) -> int:
        row = self._one("SELECT COALESCE(MAX(id), 0) AS m FROM revocations")
        return int(row["m"]) if row else 0

    def stats(self) -> dict[str, int]:
        q = self.conn.execute
        return {
            "clients": q("SELECT COUNT(*) FROM clients").fetchone()[0],
            "live_grants": q("SELECT COUNT(*) FROM grants WHERE revoked IS NULL").fetchone()[0],
            "pending_codes": q("SELECT COUNT(*) FROM device_codes WHERE status = 'pending'").fetchone()[0],
        }
