"""What every page shares: the session cookie, CSRF checks, rendering, and the one place errors become pages.

Handlers (web/activate.py, web/admin.py) stay thin: read the form, call the
service, render. Order of checks on every POST: body size (413, middleware),
CSRF (403), signed in (401), throttle (429), then the service's own errors
(ActivationError: 404, 409, 410), each rendered as a page with its status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from authsvc.clock import Clock
from authsvc.errors import ActivationError
from authsvc.service import AuthService
from authsvc.throttle import Throttle
from authsvc.web.session import COOKIE_NAME, Session, Sessions, csrf_ok

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
MAX_FORM_FIELDS = 16
MAX_USER_CODE_CHARS = 32
_NEXT_PAGES = ("/activate", "/admin")


class PageError(Exception):
    """A request the pages refuse; `message` is for the person."""

    status = 400
    title = "Something is wrong with that request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CsrfFailure(PageError):
    status = 403
    title = "This form has expired"

    def __init__(self) -> None:
        super().__init__("The form was too old or did not come from this site, so nothing was done. "
                         "Go back, reload the page and try again.")


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


ERROR_TITLES = {404: "Code not found", 409: "Code already used", 410: "Code expired",
                429: "Too many attempts"}


def activate_url(user_code: str = "") -> str:
    code = user_code.strip()[:MAX_USER_CODE_CHARS]
    return "/activate?" + urlencode({"user_code": code}) if code else "/activate"


def safe_next(value: str) -> str:
    """Where to go after signing in: only our own pages, rebuilt rather than passed through."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return "/activate"
    if parts.scheme or parts.netloc or parts.path not in _NEXT_PAGES:
        return "/activate"
    if parts.path == "/activate":
        return activate_url(parse_qs(parts.query).get("user_code", [""])[0])
    return parts.path


def user_code_of(next_url: str) -> str:
    return parse_qs(urlsplit(next_url).query).get("user_code", [""])[0]


def wait_words(seconds: float) -> str:
    return "a minute" if seconds == 60 else f"{seconds:g} seconds"


@dataclass
class Web:
    service: AuthService
    clock: Clock
    sessions: Sessions
    code_throttle: Throttle
    login_throttle: Throttle

    @classmethod
    def create(cls, service: AuthService, clock: Clock) -> Web:
        s = service.settings
        wait = wait_words(s.failure_window)
        return cls(service, clock, Sessions(service.keys.secrets["web_session"]),
                   Throttle(s.max_failures, s.failure_window,
                            message=f"Too many wrong codes from this computer. Wait {wait}, then try again."),
                   Throttle(s.max_failures, s.failure_window,
                            message=f"Too many failed sign-ins from this computer. Wait {wait}, then try again."))

    def now(self) -> float:
        return self.clock.now()

    @staticmethod
    def source(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    # -- the session ------------------------------------------------------------------
    def session(self, request: Request) -> Session:
        """The visitor's session; a new anonymous one (sent with the response) when there is none."""
        current: Session | None = getattr(request.state, "session", None)
        if current is None:
            current = self.sessions.decode(request.cookies.get(COOKIE_NAME), self.now())
            if current is None:
                self.replace_session(request, self.sessions.new(self.now()))
                return request.state.session
            request.state.session = current
        return current

    def replace_session(self, request: Request, session: Session) -> None:
        request.state.session = session
        request.state.session_changed = True

    def _attach(self, request: Request, response: Response) -> Response:
        if getattr(request.state, "session_changed", False):
            session: Session = request.state.session
            response.set_cookie(COOKIE_NAME, self.sessions.encode(session),
                                max_age=max(0, int(session.expires - self.now())), path="/",
                                secure=request.url.scheme == "https", httponly=True, samesite="strict")
        return response

    # -- forms ---------------------------------------------------------------------------
    async def posted(self, request: Request) -> dict[str, str]:
        """The fields of a POSTed form, once its CSRF token has been checked."""
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not csrf_ok(self.session(request), fields.get("csrf")):
            raise CsrfFailure()
        return fields

    def require_user(self, request: Request, next_url: str) -> str:
        user = self.session(request).user
        if user is None:
            raise LoginRequired(next_url)
        return user

    # -- responses --------------------------------------------------------------------------
    def render(self, request: Request, template: str, context: dict[str, Any] | None = None,
               status: int = 200) -> Response:
        session = self.session(request)
        ctx = {"user": session.user, "csrf": session.csrf, **(context or {})}
        return self._attach(request, TEMPLATES.TemplateResponse(request, template, ctx, status_code=status))

    def redirect(self, request: Request, url: str) -> Response:
        return self._attach(request, RedirectResponse(url, status_code=303))

    def login_page(self, request: Request, next_url: str, *, status: int = 200, error: str | None = None,
                   username: str = "") -> Response:
        return self.render(request, "login.html", {"next": next_url, "user_code": user_code_of(next_url),
                                                   "error": error, "username": username}, status)

    def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "error.html", {"title": title, "message": message}, status)

    # -- the one place errors become pages -----------------------------------------------------
    def exception_handlers(self) -> dict[Any, Any]:
        async def activation_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ActivationError)
            return self.error_page(request, exc.status, ERROR_TITLES.get(exc.status, "That code cannot be used"),
                                   exc.message)

        async def page_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, PageError)
            return self.error_page(request, exc.status, exc.title, exc.message)

        async def login_required(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, LoginRequired)
            return self.login_page(request, exc.next_url, status=401)

        return {ActivationError: activation_error, PageError: page_error, LoginRequired: login_required}
