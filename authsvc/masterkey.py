"""Where the master key lives: `IOTAUTH_MASTER_KEY`, else the OS keyring, else a 0600 file beside the data dir.

`iotauth init` takes the first usable source and records which one (never the key) in the data dir's
meta table; every later open looks in that same place, so a data dir keeps opening with the source it
was initialised with. `IOTAUTH_MASTER_KEY`, when set, always wins: it is how a key is moved out of a
file or a keyring. A keyring is usable when `keyring.get_keyring()` is a real backend (not the fail or
null one) and storing the key then reading it back works; a headless Pi usually has none, so there
the key file is the common case.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authsvc.keys import SealError, b64u, b64u_decode

MASTER_KEY_ENV = "IOTAUTH_MASTER_KEY"
KEYRING_ENV = "IOTAUTH_KEYRING"  # "0": `iotauth init` does not use the OS keyring
KEYRING_SERVICE = "iotauth"
ENV, KEYRING, FILE = "env", "keyring", "file"  # the source recorded in the meta table
SOURCES = (ENV, KEYRING, FILE)


@dataclass(frozen=True)
class MasterKey:
    key: bytes = field(repr=False)
    source: str  # one of SOURCES
    where: str  # for messages: where the key was found
    entry: str | None = None  # the keyring user name (recorded with the source)


def master_key_file(data_dir: Path) -> Path:
    return data_dir.parent / f"{data_dir.name}.masterkey"


def _decode(text: str) -> bytes:
    try:
        key = b64u_decode(text.strip())
    except (ValueError, TypeError):  # binascii.Error and UnicodeEncodeError are ValueErrors
        return b""
    return key if len(key) == 32 else b""


# -- the environment variable -------------------------------------------------------------
def _from_env(text: str) -> MasterKey:
    key = _decode(text)
    if not key:
        raise SealError(f"{MASTER_KEY_ENV} must be 32 bytes encoded as base64url (43 characters)")
    return MasterKey(key, ENV, f"the {MASTER_KEY_ENV} environment variable")


# -- the OS keyring -----------------------------------------------------------------------
def _keyring_backend() -> Any | None:
    """The OS keyring backend, or None when there is no real one (the fail or null backend)."""
    try:
        import keyring
        from keyring.backends import fail, null
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a broken keyring configuration means no keyring, not a crash
        return None
    return None if isinstance(backend, (fail.Keyring, null.Keyring)) else backend


def _backend_name(backend: Any) -> str:
    return str(getattr(backend, "name", type(backend).__name__))


def _keyring_where(backend: Any, entry: str) -> str:
    return f"the OS keyring ({_backend_name(backend)}) under service {KEYRING_SERVICE!r}, user {entry!r}"


def _store_in_keyring(backend: Any, entry: str, key: bytes) -> bool:
    """Store the key and read it back; any failure (locked, no D-Bus, prompt dismissed) means: use the file."""
    try:
        backend.set_password(KEYRING_SERVICE, entry, b64u(key))
        if backend.get_password(KEYRING_SERVICE, entry) == b64u(key):
            return True
    except Exception:
        pass
    try:
        backend.delete_password(KEYRING_SERVICE, entry)
    except Exception:
        pass
    return False


def _new_in_keyring(data_dir: Path) -> MasterKey | None:
    if os.environ.get(KEYRING_ENV, "").strip() == "0":
        return None
    backend = _keyring_backend()
    if backend is None:
        return None
    entry = str(data_dir.resolve())
    key = secrets.token_bytes(32)
    if not _store_in_keyring(backend, entry, key):
        return None
    return MasterKey(key, KEYRING, _keyring_where(backend, entry), entry)


def _from_keyring(entry: str | None) -> MasterKey:
    if not entry:
        raise SealError("the meta table records the OS keyring as the master key source but no keyring entry;"
                        f" set {MASTER_KEY_ENV}")
    backend = _keyring_backend()
    if backend is None:
        raise SealError(f"the master key is in the OS keyring (service {KEYRING_SERVICE!r}, user {entry!r}) but no"
                        f" keyring is available here; unlock it or set {MASTER_KEY_ENV}")
    where = _keyring_where(backend, entry)
    try:
        text = backend.get_password(KEYRING_SERVICE, entry)
    except Exception as exc:
        raise SealError(f"cannot read the master key from {where}: {type(exc).__name__}") from None
    if text is None:
        raise SealError(f"no master key in {where}; set {MASTER_KEY_ENV} or run `iotauth init --force`")
    key = _decode(text)
    if not key:
        raise SealError(f"{where}: not a 32-byte base64url master key")
    return MasterKey(key, KEYRING, where, entry)


# -- the key file beside the data dir ----------------------------------------------------
def _from_file(data_dir: Path) -> MasterKey | None:
    path = master_key_file(data_dir)
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        raise SealError(f"{path}: the master key file is readable by other users; run `chmod 600 {path}`")
    try:
        key = _decode(path.read_text(encoding="ascii"))
    except (ValueError, OSError):  # UnicodeDecodeError is a ValueError
        key = b""
    if not key:
        raise SealError(f"{path}: not a 32-byte base64url master key")
    return MasterKey(key, FILE, f"the key file {path}")


def _new_file(data_dir: Path) -> MasterKey:
    path = master_key_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(b64u(key) + "\n")
    return MasterKey(key, FILE, f"the key file {path} (mode 0600)")


# -- the two entry points ------------------------------------------------------------------
def create_master_key(data_dir: Path) -> MasterKey:
    """At `init`: the environment variable, else a new key in the OS keyring, else the key file (kept if
    present)."""
    env = os.environ.get(MASTER_KEY_ENV)
    if env:
        return _from_env(env)
    return _new_in_keyring(data_dir) or _from_file(data_dir) or _new_file(data_dir)


def load_master_key(data_dir: Path, source: str | None, entry: str | None = None) -> MasterKey:
    """The key from the source recorded at `init` (None: a data dir from before sources were recorded: the file)."""
    env = os.environ.get(MASTER_KEY_ENV)
    if env:
        return _from_env(env)
    if source == ENV:
        raise SealError(f"no master key: this data dir was initialised with {MASTER_KEY_ENV}, which is not set")
    if source == KEYRING:
        return _from_keyring(entry)
    if source not in (FILE, None):
        raise SealError(f"unknown master key source {source!r} in the meta table"
                        f" (expected one of {', '.join(SOURCES)})")
    found = _from_file(data_dir)
    if found is None:
        raise SealError(f"no master key: set {MASTER_KEY_ENV} or run `iotauth init` "
                        f"(expected {master_key_file(data_dir)})")
    return found
