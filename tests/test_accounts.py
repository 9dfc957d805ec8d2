"""Local accounts (authsvc/accounts.py): the dummy hash for unknown accounts is made on first use, not at import.

Every CLI command imports the module (through authsvc.datadir); an argon2 hash at import cost each of them
~0.2 s (`iotauth revoke` start to closed socket, bench 5). Logins stay constant-time: the dummy is made by
the first login of the process whether its account exists or not, so that one is no slower for a stranger.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authsvc.accounts import hash_password, verify_password

ROOT = Path(__file__).resolve().parent.parent
COUNTING = """
import argon2, sys
calls = []
real = argon2.PasswordHasher.hash
argon2.PasswordHasher.hash = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
import authsvc.accounts
assert calls == [], "hashed at import"
stored = None if sys.argv[1] == "unknown" else sys.argv[2]
assert authsvc.accounts.verify_password(stored, "correct horse") is (stored is not None)
assert calls == [1], calls  # the dummy, made by the first login
authsvc.accounts.verify_password(None, "other")
authsvc.accounts.verify_password(stored, "other")
assert calls == [1], calls  # and only once
"""


@pytest.mark.parametrize("first_login", ["unknown", "known"])
def test_import_hashes_nothing_and_the_first_login_makes_the_dummy_whatever_the_account(first_login):
    subprocess.run([sys.executable, "-c", COUNTING, first_login, hash_password("correct horse")],
                   check=True, cwd=ROOT)


def test_unknown_and_known_accounts_verify_as_before():
    stored = hash_password("correct horse")
    assert verify_password(stored, "correct horse") is True
    assert verify_password(stored, "wrong") is False
    assert verify_password(None, "correct horse") is False
    assert verify_password("not a hash", "x") is False
