"""The RFC 8628 section 3.3 verification pages: sign in, enter the user code, approve or deny.

GET  /activate[?user_code=]  sign-in form, or the code form prefilled (verification_uri_complete)
POST /activate               user_code, csrf -> the consent page (device, client_id, scopes in plain words)
POST /activate/decision      user_code, decision=approve|deny, csrf -> the result page
GET  /login[?next=]          the sign-in form
POST /login                  username, password, csrf, next -> 303 to next, with a new session
POST /logout                 csrf -> 303 to /login, the session ended

Wrong user codes and wrong passwords are throttled per source (authsvc/throttle.py, cases.md F1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsvc.accounts import verify_password
from authsvc.errors import UnknownUserCode
from authsvc.service import PendingRequest
from authsvc.web.pages import MAX_USER_CODE_CHARS, PageError, Web, activate_url, safe_next
from broker.acl import valid_identity

T = TypeVar("T")
WRONG_LOGIN = "Wrong user name or password"
MAX_PASSWORD_CHARS = 1024


def _throttled_code(web: Web, request: Request, call: Callable[[float], T]) -> T:
    """Run a user-code lookup under the code throttle; a code that matches nothing counts as a failure.

    A right code does not clear earlier failures: knowing one valid code must not buy more guesses.
    """
    source, now = web.source(request), web.now()
    web.code_throttle.check(source, now)
    try:
        return call(now)
    except UnknownUserCode:
        web.code_throttle.failure(source, now)
        raise


def _entered_code(fields: dict[str, str]) -> str:
    return fields.get("user_code", "")[:MAX_USER_CODE_CHARS]


def routes(web: Web) -> list[Route]:
    service = web.service

    async def activate_page(request: Request) -> Response:
        code = request.query_params.get("user_code", "")[:MAX_USER_CODE_CHARS]
        if web.session(request).user is None:
            return web.login_page(request, activate_url(code))
        return web.render(request, "activate.html", {"user_code": code})

    async def activate_code(request: Request) -> Response:
        fields = await web.posted(request)
        entered = _entered_code(fields)
        web.require_user(request, activate_url(entered))
        pending = _throttled_code(web, request, lambda now: service.pending_request(entered, now))
        minutes = max(1, round((pending.expires - web.now()) / 60))
        return web.render(request, "consent.html", {"pending": pending, "minutes": minutes})

    async def activate_decision(request: Request) -> Response:
        fields = await web.posted(request)
        entered = _entered_code(fields)
        user = web.require_user(request, activate_url(entered))
        decision = fields.get("decision")
        if decision not in ("approve", "deny"):
            raise PageError("Choose Approve or Deny.")
        approve = decision == "approve"
        decided: PendingRequest = _throttled_code(
            web, request, lambda now: service.decide(entered, user, approve, now))
        return web.render(request, "result.html", {"pending": decided, "approved": approve})

    async def login_page(request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next", ""))
        if web.session(request).user is not None:
            return web.redirect(request, next_url)
        return web.login_page(request, next_url)

    async def login(request: Request) -> Response:
        fields = await web.posted(request)
        next_url = safe_next(fields.get("next", ""))
        username, password = fields.get("username", "").strip(), fields.get("password", "")
        source, now = web.source(request), web.now()
        web.login_throttle.check(source, now)
        stored = service.store.password_hash(username) if valid_identity(username) else None
        # argon2 takes a while: off the event loop, which also runs the broker
        ok = len(password) <= MAX_PASSWORD_CHARS and await run_in_threadpool(verify_password, stored, password)
        if not ok:
            web.login_throttle.failure(source, now)
            return web.login_page(request, next_url, status=401, error=WRONG_LOGIN, username=username[:64])
        web.login_throttle.success(source)
        web.sessions.end(web.session(request), now)
        web.replace_session(request, web.sessions.new(now, username))  # rotate: nothing from before carries over
        return web.redirect(request, next_url)

    async def logout(request: Request) -> Response:
        await web.posted(request)
        now = web.now()
        web.sessions.end(web.session(request), now)
        web.replace_session(request, web.sessions.new(now))
        return web.redirect(request, "/login")

    return [
        Route("/activate", activate_page, methods=["GET"]),
        Route("/activate", activate_code, methods=["POST"]),
        Route("/activate/decision", activate_decision, methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
