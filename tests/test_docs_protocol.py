"""docs/protocol.md stays in step with the code: every error code, topic, metadata field, scope and limit.

Static checks only (no server): the doc's payloads were captured from the running product; these tests
catch drift when the code later changes a name, a code or a default the doc states.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest

from authsvc import dpop, mqtt_api
from authsvc.service import ENDPOINTS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
DEFAULTS = tomllib.loads((ROOT / "config" / "default.toml").read_text(encoding="utf-8"))
PREFIX = DEFAULTS["mqtt"]["topic_prefix"]


def error_codes() -> set[str]:
    """The `error` class attribute of every OAuthError subclass in authsvc/errors.py."""
    tree = ast.parse((ROOT / "authsvc" / "errors.py").read_text(encoding="utf-8"))
    codes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    target = stmt.target
                elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                    target = stmt.targets[0]
                else:
                    continue
                value = stmt.value
                if isinstance(target, ast.Name) and target.id == "error" and isinstance(value, ast.Constant):
                    codes.add(value.value)
    return codes


def section(title_start: str) -> str:
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert match, f"docs/protocol.md has no section starting {title_start!r}"
    return match.group(0)


def json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", DOC, re.DOTALL)


def test_error_codes_are_found_in_code():
    assert len(error_codes()) >= 13, "errors.py parsing broke"


def test_doc_error_table_lists_exactly_the_codes_the_service_defines():
    rows = [r for r in re.findall(r"^\| `([a-z_]+)` \|", section("9. Errors"), re.MULTILINE) if r != "error"]
    assert sorted(rows) == sorted(error_codes())
    assert len(rows) == len(set(rows))


def test_every_request_and_reply_topic_is_named():
    for endpoint in ENDPOINTS:
        assert f"`{PREFIX}/{endpoint}`" in DOC
    assert f"`{PREFIX}/reply/<reply-id>`" in DOC
    assert f"`{PREFIX}/jwks`" in DOC


def test_doc_names_no_topic_under_the_prefix_that_does_not_exist():
    known = set(ENDPOINTS) | {"reply", "jwks"}
    used = set(re.findall(rf"{re.escape(PREFIX)}/([A-Za-z_]+)", DOC))
    assert used <= known, f"unknown topics in the doc: {used - known}"


def test_every_mqtt_metadata_extension_field_is_named():
    source = (ROOT / "authsvc" / "web" / "app.py").read_text(encoding="utf-8")
    fields = set(re.findall(r'"(mqtt_[a-z_]+)"\s*:', source))
    assert len(fields) >= 5
    for name in fields:
        assert f"`{name}`" in DOC, name


def test_scope_table_matches_the_shipped_catalogue():
    table = section("8. Topic ACLs")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", table, re.MULTILINE)}
    assert set(rows) == set(DEFAULTS["scopes"])
    for name, scope in DEFAULTS["scopes"].items():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        publish, subscribe = cells[1], cells[2]
        assert sorted(re.findall(r"`([^`]+)`", publish)) == sorted(scope["publish"]), name
        assert sorted(re.findall(r"`([^`]+)`", subscribe)) == sorted(scope["subscribe"]), name


def test_limits_and_timers_match_the_defaults():
    mqtt, tokens, proof = DEFAULTS["mqtt"], DEFAULTS["tokens"], DEFAULTS["dpop"]
    limits = section("10. Limits")
    assert f"| request payload | {mqtt['max_request_size'] // 1024} KiB |" in limits
    assert f"| MQTT packet (whole packet) | {mqtt['max_packet_size'] // 1024} KiB |" in limits
    assert f"{dpop.MAX_PROOF_BYTES // 1024} KiB; `jti` at most {dpop.MAX_JTI_CHARS} characters" in limits
    assert f"| `correlation_id` | at most {mqtt_api.MAX_CORRELATION_ID} characters |" in limits
    low, high = re.search(r"\{(\d+),(\d+)\}", mqtt_api.REPLY_ID.pattern).groups()
    assert f"| reply-id | {low}–{high} characters of `[A-Za-z0-9_-]` |" in limits
    assert f"| {tokens['device_code_ttl']} s |" in limits
    assert f"| {tokens['poll_interval']} s, +5 s per `slow_down` |" in limits
    assert f"| {tokens['access_ttl']} s (never more) |" in limits
    assert f"| {tokens['refresh_ttl_days']} days from its issue;" in limits
    assert f"| {tokens['refresh_grace']} s after a rotation," in limits
    assert f"fixed {proof['nonce_step'] // 60}-minute steps" in limits
    assert f"| ±{proof['iat_window']} s |" in limits
    assert f"| {mqtt['connect_timeout']} s |" in limits
    window = f"{mqtt['connect_attempts_per_source']} in {mqtt['connect_attempt_window']} s"
    assert f"| CONNECTs per network address | {window}, not counting" in limits
    assert f"| bootstrap sessions per network address | {mqtt['bootstrap_sessions_per_source']} at once" in limits
    assert f"more than {mqtt['connect_attempts_per_source']} CONNECTs in {mqtt['connect_attempt_window']} s" \
        in section("6. CONNECT")
    assert f"`{mqtt['audience']}`" in DOC


@pytest.mark.parametrize("code", [0, 2, 3, 5])
def test_connack_codes_are_explained(code):
    assert re.search(rf"^\| {code} \| \w", section("6. CONNECT"), re.MULTILINE)


def test_dpop_claims_and_connect_credentials_are_named():
    for claim in ("typ", "alg", "jwk", "jti", "iat", "htm", "htu", "ath", "nonce"):
        assert f"`{claim}`" in DOC or f'"{claim}"' in DOC, claim
    assert '"typ": "dpop+jwt"' in DOC and '"htm": "CONNECT"' in DOC and '"htm": "PUBLISH"' in DOC
    assert "ClientId = `client_id` = Username" in DOC
    assert "Password = access token, one ASCII space, a new CONNECT proof" in DOC


def test_json_examples_parse():
    decoder = json.JSONDecoder()
    for block in json_blocks():
        text, pos, values = block.strip(), 0, 0
        while pos < len(text):
            _, end = decoder.raw_decode(text, pos)
            values += 1
            pos = end
            while pos < len(text) and text[pos].isspace():
                pos += 1
        assert values >= 1


def test_error_descriptions_quoted_in_the_doc_come_from_the_code():
    """Each quoted description exists in authsvc/ (f-string fields and numbers compared as placeholders)."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "authsvc").rglob("*.py"))
    normalised = re.sub(r"\{[^{}]*\}", "{}", source)
    quoted = set(re.findall(r'"error_description": "([^"]+)"', DOC))
    quoted |= set(re.findall(r'\(\s*"([A-Z][^"]+)"\s*\)', DOC.replace("\n   ", " ")))
    assert len(quoted) >= 8
    for text in quoted:
        assert text in source or re.sub(r"\d+", "{}", text) in normalised, text
