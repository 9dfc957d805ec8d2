"""The data dir: `iotauth init` creates it; every command opens the service from it."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from authsvc.accounts import generate_password, hash_password
from authsvc.config import Settings
from authsvc.keyring import KeyRing
from authsvc.keys import Sealer, SealError
from authsvc.masterkey import MASTER_KEY_ENV, create_master_key, load_master_key, master_key_file
from authsvc.service import AuthService
from authsvc.store import Store, StoreError

ADMIN_USER = "admin"
ADMIN_PASSWORD_ENV = "IOTAUTH_ADMIN_PASSWORD"


class DataDirError(RuntimeError):
    """The data dir cannot be created or opened; the message is one line for the user."""


@dataclass(frozen=True)
class InitReport:
    data_dir: Path
    master_key_source: str
    admin_password: str | None  # set only when generated, to be printed once


def init_data_dir(settings: Settings, *, force: bool, now: float) -> InitReport:
    data_dir = settings.data_dir
    if settings.db_path.exists():
        if not force:
            raise DataDirError(f"{data_dir} already holds an iotauth database; use --force to start over")
        shutil.rmtree(data_dir)
        if os.environ.get(MASTER_KEY_ENV) is None:
            master_key_file(data_dir).unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    try:
        master = create_master_key(data_dir)
        store = Store.open(settings.db_path, create=True)
    except (SealError, StoreError, OSError) as exc:
        raise DataDirError(str(exc)) from None
    os.chmod(settings.db_path, 0o600)
    store.record_master_key_source(master.source, master.entry)  # where, never what: `serve` looks there
    keyring = KeyRing(store, Sealer(master.key), settings.access_ttl)
    keyring.ensure_signing_key(now)
    password = os.environ.get(ADMIN_PASSWORD_ENV)
    generated = None
    if not password:
        password = generated = generate_password()
    store.add_user(ADMIN_USER, hash_password(password), now)
    store.close()
    return InitReport(data_dir, master.where, generated)


def open_service(settings: Settings) -> AuthService:
    try:
        store = Store.open(settings.db_path)
    except StoreError as exc:
        raise DataDirError(str(exc)) from None
    try:
        master = load_master_key(settings.data_dir, *store.master_key_source())
    except SealError as exc:
        store.close()
        raise DataDirError(f"{settings.data_dir}: {exc}") from None
    try:
        keyring = KeyRing(store, Sealer(master.key), settings.access_ttl)
    except SealError as exc:
        store.close()
        raise DataDirError(f"{settings.data_dir}: {exc} (master key from {master.where})") from None
    if not keyring.verification_keys():
        store.close()
        raise DataDirError(f"{settings.db_path}: no signing key; run `iotauth init --force`")
    return AuthService(settings, store, keyring)
