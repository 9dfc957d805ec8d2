"""The web pages over real HTTP: a real data dir, the real server (`running()`, conftest `server`), httpx.

Time is the fake clock the server reads, so expiry (F3) and throttle windows (F1) pass without sleeping.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from authsvc.errors import TooManyAttempts
from authsvc.throttle import Throttle
from authsvc.web.pages import safe_next
from authsvc.web.session import COOKIE_NAME, Sessions
from tests.conftest import ADMIN_PASSWORD, ServerThread

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Visitor:
    """One browser: a cookie jar and the CSRF token of the last page it saw."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=10)
        self.csrf = ""

    def _seen(self, response: httpx.Response) -> httpx.Response:
        found = CSRF.search(response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def get(self, path: str) -> httpx.Response:
        return self._seen(self.http.get(path))

    def post(self, path: str, data: dict[str, str], *, csrf: bool = True) -> httpx.Response:
        fields = {"csrf": self.csrf, **data} if csrf else data
        return self._seen(self.http.post(path, data=fields))

    def sign_in(self, password: str = ADMIN_PASSWORD, username: str = "admin",
                next_url: str = "/activate") -> httpx.Response:
        if not self.csrf:
            self.get("/login")
        response = self.post("/login", {"username": username, "password": password, "next": next_url})
        if response.status_code == 303:
            self.get(response.headers["location"])  # the page after sign-in, with the new session's token
        return response

    def enter(self, code: str) -> httpx.Response:
        return self.post("/activate", {"user_code": code})

    def decide(self, code: str, decision: str) -> httpx.Response:
        return self.post("/activate/decision", {"user_code": code, "decision": decision})


@pytest.fixture
def visitor(server: ServerThread) -> Iterator[Visitor]:
    v = Visitor(server.http_url)
    yield v
    v.http.close()


@pytest.fixture
def owner(visitor: Visitor) -> Visitor:
    assert visitor.sign_in().status_code == 303
    return visitor


def new_code(server: ServerThread, client_id: str = "lamp-1") -> str:
    response = server.call(server.service.device_authorization, {"client_id": client_id}, server.clock.now())
    return response["user_code"]


def status_of(server: ServerThread, code: str) -> tuple[str, str | None]:
    row = server.call(server.service.store.device_code_by_user_code, code)
    return row.status, row.sub


def other_codes(code: str, n: int) -> list[str]:
    """Well-formed user codes that are not `code` (and were never issued in this fresh data dir)."""
    candidates = [f"{a}{a}{a}{d}{d}{d}" for a, d in zip("BCDEFGHJKM", "2345678923")]
    return [c for c in candidates if c != code][:n]


# -- signing in --------------------------------------------------------------------------------------
def test_activate_asks_to_sign_in_first_and_carries_the_code(server: ServerThread, visitor: Visitor) -> None:
    code = new_code(server)
    page = visitor.get(f"/activate?user_code={code}")
    assert page.status_code == 200
    assert 'name="password"' in page.text and 'name="user_code"' not in page.text
    assert f'name="next" value="/activate?user_code={code}"' in page.text

    response = visitor.post("/login", {"username": "admin", "password": ADMIN_PASSWORD,
                                       "next": f"/activate?user_code={code}"})
    assert response.status_code == 303
    assert response.headers["location"] == f"/activate?user_code={code}"
    page = visitor.get(response.headers["location"])
    assert re.search(rf'id="user_code" name="user_code" value="{code}"', page.text)


def test_pages_and_actions_need_a_signed_in_user(server: ServerThread, visitor: Visitor) -> None:
    code = new_code(server)
    visitor.get("/activate")
    for path, data in [("/activate", {"user_code": code}),
                       ("/activate/decision", {"user_code": code, "decision": "approve"}),
                       ("/admin/revoke", {"client_id": "lamp-1"})]:
        response = visitor.post(path, data)
        assert response.status_code == 401, path
        assert 'name="password"' in response.text
    assert visitor.get("/admin").status_code == 401
    assert status_of(server, code) == ("pending", None)


def test_wrong_password_and_unknown_user_get_the_same_401(server: ServerThread, visitor: Visitor) -> None:
    wrong_password = visitor.sign_in(password="not the password")
    unknown_user = visitor.sign_in(username="mallory", password=ADMIN_PASSWORD)
    for response in (wrong_password, unknown_user):
        assert response.status_code == 401
        assert "Wrong user name or password" in response.text
    assert visitor.get("/admin").status_code == 401


def test_sign_in_goes_only_to_our_own_pages(visitor: Visitor) -> None:
    assert visitor.sign_in(next_url="https://evil.example/activate").headers["location"] == "/activate"
    assert safe_next("//evil.example/admin") == "/activate"
    assert safe_next("/\\evil.example") == "/activate"
    assert safe_next("/admin") == "/admin"
    assert safe_next("/activate?user_code=abc-234&x=1") == "/activate?user_code=abc-234"


# -- CSRF ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_posts_without_the_sessions_csrf_token_are_refused_403(server: ServerThread, owner: Visitor,
                                                               token: str | None) -> None:
    code = new_code(server)
    for path, data in [("/activate", {"user_code": code}),
                       ("/activate/decision", {"user_code": code, "decision": "approve"}),
                       ("/admin/revoke", {"client_id": "lamp-1"}),
                       ("/logout", {}),
                       ("/login", {"username": "admin", "password": ADMIN_PASSWORD, "next": "/admin"})]:
        fields = dict(data) if token is None else {**data, "csrf": token}
        response = owner.post(path, fields, csrf=False)
        assert response.status_code == 403, path
        assert "This form has expired" in response.text
    assert status_of(server, code) == ("pending", None)
    assert owner.get("/admin").status_code == 200  # still signed in: the forged logout did nothing


def test_a_token_from_another_session_is_refused(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server)
    stranger = Visitor(server.http_url)
    stranger.get("/activate")
    response = owner.post("/activate/decision", {"user_code": code, "decision": "approve",
                                                 "csrf": stranger.csrf}, csrf=False)
    assert response.status_code == 403
    assert status_of(server, code) == ("pending", None)


# -- the device flow: F1-F4 ------------------------------------------------------------------------
def test_f1_five_wrong_codes_lock_out_the_source_then_the_window_passes(server: ServerThread,
                                                                        owner: Visitor) -> None:
    code = new_code(server)
    for wrong in other_codes(code, 5):
        assert owner.enter(wrong).status_code == 404
        server.clock.advance(5)
    sixth = owner.enter(code)
    assert sixth.status_code == 429 and "Too many wrong codes" in sixth.text
    assert owner.decide(code, "approve").status_code == 429
    assert status_of(server, code) == ("pending", None)

    server.clock.advance(60)
    assert owner.enter(code).status_code == 200
    assert owner.decide(code, "approve").status_code == 200
    assert status_of(server, code) == ("approved", "admin")


def test_f1_wrong_codes_spread_over_more_than_the_window_do_not_lock(server: ServerThread,
                                                                     owner: Visitor) -> None:
    code = new_code(server)
    for wrong in other_codes(code, 8):
        assert owner.enter(wrong).status_code == 404
        server.clock.advance(16)  # never 5 within 60 s
    assert owner.enter(code).status_code == 200


def test_f1_wrong_passwords_are_throttled_the_same_way(server: ServerThread, visitor: Visitor) -> None:
    for _ in range(5):
        assert visitor.sign_in(password="guess").status_code == 401
    locked = visitor.sign_in()
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
    assert visitor.get("/admin").status_code == 401
    server.clock.advance(60)
    assert visitor.sign_in().status_code == 303
    assert visitor.get("/admin").status_code == 200


@pytest.mark.parametrize("entered", [str.lower, lambda c: f"{c[:3]}-{c[3:]}",
                                     lambda c: f" {c[:3].lower()} {c[3:]} "],
                         ids=["lower case", "dash", "spaces"])
def test_f2_entry_ignores_case_spaces_and_dashes(server: ServerThread, owner: Visitor, entered) -> None:
    code = new_code(server)
    page = owner.enter(entered(code))
    assert page.status_code == 200
    assert "Desk lamp" in page.text and f'name="user_code" value="{code}"' in page.text


def test_f2_near_misses_find_nothing(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server)
    for near in (code[:5], code + "2", "X" + code):
        page = owner.enter(near)
        assert page.status_code == 404, near
        assert "No pending request has that code" in page.text


def test_f3_expired_code_shows_expired_and_stores_nothing(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server)
    server.clock.advance(601)
    page = owner.enter(code)
    assert page.status_code == 410 and "expired" in page.text
    assert owner.decide(code, "approve").status_code == 410
    assert status_of(server, code) == ("pending", None)


@pytest.mark.parametrize("first, then", [("deny", "approve"), ("approve", "deny")])
def test_f4_a_decided_code_is_already_used_and_cannot_flip(server: ServerThread, owner: Visitor,
                                                          first: str, then: str) -> None:
    code = new_code(server)
    assert owner.enter(code).status_code == 200
    assert owner.decide(code, first).status_code == 200
    decided = status_of(server, code)
    again = owner.enter(code)
    assert again.status_code == 409 and "already used" in again.text
    flip = owner.decide(code, then)
    assert flip.status_code == 409 and "already used" in flip.text
    assert status_of(server, code) == decided


def test_approve_shows_what_the_device_may_now_do(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server, "thermo-1")
    consent = owner.enter(code)
    assert "Living-room thermostat" in consent.text and "thermo-1" in consent.text
    assert "Report its own temperature readings" in consent.text
    assert "Receive power on/off commands for itself" in consent.text
    result = owner.decide(code, "approve")
    assert result.status_code == 200
    assert "is now allowed to" in result.text and "Report its own temperature readings" in result.text
    assert status_of(server, code) == ("approved", "admin")


def test_deny_says_denied(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server)
    owner.enter(code)
    result = owner.decide(code, "deny")
    assert result.status_code == 200 and "Denied" in result.text
    assert status_of(server, code) == ("denied", "admin")


def test_a_decision_other_than_approve_or_deny_is_400(server: ServerThread, owner: Visitor) -> None:
    code = new_code(server)
    assert owner.decide(code, "maybe").status_code == 400
    assert status_of(server, code) == ("pending", None)


def test_entered_text_is_escaped(owner: Visitor) -> None:
    page = owner.get('/activate?user_code="><script>alert(1)</script>')
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text


# -- the session cookie --------------------------------------------------------------------------------
def _cookie_header(response: httpx.Response) -> str:
    return next(h for h in response.headers.get_list("set-cookie") if h.startswith(COOKIE_NAME + "="))


def test_session_cookie_is_httponly_samesite_strict_and_rotates_on_sign_in(visitor: Visitor) -> None:
    first = visitor.get("/activate")
    before, token_before = visitor.http.cookies[COOKIE_NAME], visitor.csrf
    flags = [part.strip().lower() for part in _cookie_header(first).split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags

    response = visitor.sign_in()
    flags = [part.strip().lower() for part in _cookie_header(response).split(";")]
    assert "httponly" in flags and "samesite=strict" in flags
    assert visitor.http.cookies[COOKIE_NAME] != before
    assert visitor.csrf != token_before


def test_signed_out_or_tampered_cookies_do_not_sign_in(server: ServerThread, owner: Visitor) -> None:
    signed_in = owner.http.cookies[COOKIE_NAME]
    payload, mac = signed_in.split(".")
    tampered = Visitor(server.http_url)
    tampered.http.cookies.set(COOKIE_NAME, payload + "." + mac[::-1])
    assert tampered.get("/admin").status_code == 401

    assert owner.post("/logout", {}).headers["location"] == "/login"
    assert owner.get("/admin").status_code == 401
    copied = Visitor(server.http_url)
    copied.http.cookies.set(COOKIE_NAME, signed_in)
    assert copied.get("/admin").status_code == 401


def test_session_payload_round_trip_and_expiry() -> None:
    sessions = Sessions(b"k" * 32, ttl=100)
    s = sessions.new(1000.0, "admin")
    assert sessions.decode(sessions.encode(s), 1099.0) == s
    assert sessions.decode(sessions.encode(s), 1100.0) is None
    assert Sessions(b"x" * 32).decode(sessions.encode(s), 1000.0) is None


# -- headers and limits --------------------------------------------------------------------------------
def test_html_pages_carry_the_security_headers(server: ServerThread, owner: Visitor) -> None:
    pages = [owner.get("/activate"), owner.get("/admin"), owner.enter("ZZZ999"), owner.get("/login")]
    for page in pages:
        h = page.headers
        assert "default-src 'self'" in h["content-security-policy"]
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer"
        assert h["cache-control"] == "no-store"
        assert h["x-content-type-options"] == "nosniff"
        assert "<script" not in page.text and "style=" not in page.text and "<style" not in page.text
    css = owner.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_bodies_over_16_kib_get_413(server: ServerThread, visitor: Visitor) -> None:
    visitor.get("/activate")
    big = {"csrf": visitor.csrf, "username": "admin", "password": "x" * (17 * 1024), "next": "/activate"}
    assert visitor.http.post("/login", data=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"a" * 1024

    response = visitor.http.post("/login", content=chunks(),
                                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert response.headers["x-frame-options"] == "DENY"


def test_the_json_endpoints_still_work(server: ServerThread, visitor: Visitor) -> None:
    metadata = visitor.http.get("/.well-known/oauth-authorization-server").json()
    assert metadata["mqtt_device_authorization_topic"] == "oauth/v1/device_authorization"
    assert "device_authorization_endpoint" not in metadata  # /activate is the user's page, not an endpoint
    jwks = visitor.http.get("/.well-known/jwks.json")
    assert jwks.status_code == 200 and jwks.headers["cache-control"] == "max-age=300"
    assert visitor.http.get("/health").json()["status"] == "ok"


# -- admin ---------------------------------------------------------------------------------------------
def test_admin_lists_devices_and_grants_and_revokes_a_device(server: ServerThread, owner: Visitor) -> None:
    store = server.service.store
    server.call(store.add_grant, "lamp-1", "admin", "device:power", "j" * 43, server.clock.now())
    page = owner.get("/admin")
    assert page.status_code == 200
    for text in ("Desk lamp", "lamp-1", "Living-room thermostat", "thermo-1", "device:power"):
        assert text in page.text
    assert 'aria-label="Revoke lamp-1"' in page.text

    done = owner.post("/admin/revoke", {"client_id": "lamp-1"})
    assert done.status_code == 200 and "Revoked 1 grant of lamp-1" in done.text
    assert server.call(store.live_grants, "lamp-1") == []
    assert "No live grants." in owner.get("/admin").text


# -- the throttle itself (pure) ------------------------------------------------------------------------
def test_throttle_locks_after_max_failures_for_one_window_and_only_that_source() -> None:
    t = Throttle(3, 60)
    for now in (0, 1, 2):
        t.check("a", now)
        t.failure("a", now)
    with pytest.raises(TooManyAttempts):
        t.check("a", 61.9)
    t.check("b", 10)
    t.check("a", 62)
    t.failure("a", 62)  # a fresh count after the lock-out
    t.check("a", 63)


def test_throttle_memory_is_bounded() -> None:
    t = Throttle(5, 60, max_sources=100)
    for i in range(10_000):
        t.failure(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(t) <= 100
    t.failure("x", 0)
    t.success("x")
    assert not t.locked("x", 0)
