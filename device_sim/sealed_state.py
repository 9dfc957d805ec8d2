"""The device's persistent state, sealed at rest with AES-GCM.

What a device must keep across restarts: its P-256 private key (as a JWK, so the
tokens bound to its RFC 7638 thumbprint stay usable), its current refresh token
(RFC 6749 section 6; replaced on every use), the last server ``dpop_nonce``
(RFC 9449 section 8, protocol section 4) and the scope it was paired for.

File format: a JSON envelope ``{"format", "version", "nonce", "ciphertext"}``
whose ciphertext is AES-256-GCM over the JSON state, with a random 12-byte nonce
and associated data ``iotauth-device-state/v1``. The key comes from the
environment variable ``IOTAUTH_DEVICE_KEY`` (base64url of 32 bytes) or from the
file ``<state file>.key``, created once with mode 0600. Every write is atomic
(temporary file, fsync, ``os.replace``) and leaves a 0600 file.
"""

from __future__ import annotations

import binascii
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.util import urlsafe_b64decode

from device_sim.errors import StateError
from device_sim.proofs import b64url
from device_sim.roles import check_client_id

KEY_ENV = "IOTAUTH_DEVICE_KEY"
DIR_ENV = "IOTAUTH_DEVICE_DIR"
FORMAT = "iotauth-device-state"
VERSION = 1
ASSOCIATED_DATA = f"{FORMAT}/v{VERSION}".encode("ascii")
KEY_BYTES = 32
NONCE_BYTES = 12



@dataclass
class DeviceState:
    """What the device remembers. Secrets are kept out of ``repr``."""

    client_id: str
    private_jwk: dict[str, str] = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    dpop_nonce: str | None = None
    scope: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> DeviceState:
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("client_id"), str):
            raise ValueError("state is not an object with a client_id")
        jwk = raw.get("private_jwk")
        if not isinstance(jwk, dict) or "d" not in jwk:
            raise ValueError("state has no private key")
        return cls(
            client_id=raw["client_id"],
            private_jwk={str(k): str(v) for k, v in jwk.items()},
            refresh_token=_optional_str(raw.get("refresh_token")),
            dpop_nonce=_optional_str(raw.get("dpop_nonce")),
            scope=_optional_str(raw.get("scope")),
        )


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding (raises ``binascii.Error`` or ``ValueError``)."""
    return urlsafe_b64decode(text.strip().encode("ascii"))


def default_state_path(client_id: str, env: Mapping[str, str] | None = None) -> Path:
    """``$IOTAUTH_DEVICE_DIR/<client_id>.state``, else ``~/.local/share/iotauth-device/``."""
    check_client_id(client_id)
    env = os.environ if env is None else env
    base = env.get(DIR_ENV) or str(Path.home() / ".local" / "share" / "iotauth-device")
    return Path(base) / f"{client_id}.state"


def key_file_for(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".key")


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = b64url_decode(text)
    except (binascii.Error, ValueError):
        raise StateError(f"{where}: not base64url") from None
    if len(key) != KEY_BYTES:
        raise StateError(f"{where}: must be base64url of {KEY_BYTES} bytes, got {len(key)} bytes")
    return key


def _read_key_file(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StateError(f"{path}: key file is readable by others (mode {mode:04o}); chmod 600 it")
    return _decode_key(path.read_text(encoding="ascii"), str(path))


def _create_key_file(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created concurrently: use that one
        return _read_key_file(path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(b64url(key) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def resolve_key(state_path: Path, env: Mapping[str, str] | None = None) -> bytes:
    """The sealing key: ``$IOTAUTH_DEVICE_KEY``, else ``<state>.key``, created if neither exists.

    A missing key file next to an existing state file is an error rather than a
    new key: a new key could never open the old state.
    """
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return _decode_key(env[KEY_ENV], KEY_ENV)
    key_path = key_file_for(state_path)
    if key_path.exists():
        return _read_key_file(key_path)
    if state_path.exists():
        raise StateError(f"{state_path}: sealed state exists but its key is missing; "
                         f"set {KEY_ENV} or restore {key_path}")
    _ensure_dir(state_path.parent)
    return _create_key_file(key_path)


def _ensure_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def seal(state: DeviceState, key: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, state.to_json(), ASSOCIATED_DATA)
    envelope = {"format": FORMAT, "version": VERSION,
                "nonce": b64url(nonce), "ciphertext": b64url(ciphertext)}
    return json.dumps(envelope).encode("ascii") + b"\n"


def unseal(blob: bytes, key: bytes, where: str) -> DeviceState:
    """Decrypt and parse; every failure is a :class:`StateError` naming ``where``."""
    try:
        envelope = json.loads(blob)
        if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
            raise ValueError
        nonce = b64url_decode(envelope["nonce"])
        ciphertext = b64url_decode(envelope["ciphertext"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise StateError(f"{where}: not an iotauth device state file (corrupt?)") from None
    if envelope.get("version") != VERSION:
        raise StateError(f"{where}: unsupported state file version {envelope.get('version')!r}")
    if len(nonce) != NONCE_BYTES:
        raise StateError(f"{where}: corrupt state file (bad nonce)")
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, ASSOCIATED_DATA)
    except InvalidTag:
        raise StateError(f"{where}: cannot decrypt: wrong key, or the file was modified") from None
    try:
        return DeviceState.from_json(plaintext)
    except (ValueError, TypeError):
        raise StateError(f"{where}: decrypted state is malformed") from None


class StateStore(Protocol):
    """Where a :class:`~device_sim.device.Device` keeps its state."""

    def load(self) -> DeviceState | None: ...

    def save(self, state: DeviceState) -> None: ...


class SealedStore:
    """Load and save one device's :class:`DeviceState` in one sealed file."""

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StateError(f"{path}: sealing key must be {KEY_BYTES} bytes")
        self.path = path
        self._key = key

    @classmethod
    def open(cls, path: Path, env: Mapping[str, str] | None = None) -> SealedStore:
        """A store for ``path`` with its key resolved by :func:`resolve_key`."""
        return cls(path, resolve_key(path, env))

    def load(self) -> DeviceState | None:
        """The saved state, or ``None`` when there is no state file yet."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        return unseal(blob, self._key, str(self.path))

    def save(self, state: DeviceState) -> None:
        """Atomically replace the file with the sealed ``state`` (mode 0600)."""
        _ensure_dir(self.path.parent)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(seal(state, self._key))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class MemoryStore:
    """A store that keeps the state in memory only (tests, demos)."""

    def __init__(self, state: DeviceState | None = None) -> None:
        self.state = state

    def load(self) -> DeviceState | None:
        return self.state

    def save(self, state: DeviceState) -> None:
        self.state = DeviceState(**asdict(state))
