"""The HTTP side: RFC 8414 metadata, JWKS, health, metrics, the activate pages (web/activate.py) and admin."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from authsvc import metrics
from authsvc.clock import Clock
from authsvc.service import AuthService
from authsvc.web import activate, admin
from authsvc.web.headers import SecurityHeaders
from authsvc.web.pages import Web

MAX_BODY_BYTES = 16 * 1024
STATIC_DIR = Path(__file__).parent / "static"


def metadata_document(service: AuthService) -> dict[str, object]:
    s = service.settings
    return {
        "issuer": s.issuer,
        "jwks_uri": f"{s.issuer}/.well-known/jwks.json",
        # RFC 8414 requires this list; there is no authorization endpoint, so no response_type is supported
        "response_types_supported": [],
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": sorted(s.scopes),
        "dpop_signing_alg_values_supported": list(s.dpop_algorithms),
        "mqtt_device_authorization_topic": f"{s.prefix}/device_authorization",
        "mqtt_token_topic": f"{s.prefix}/token",
        "mqtt_revoke_topic": f"{s.prefix}/revoke",
        "mqtt_jwks_topic": f"{s.prefix}/jwks",
        "mqtt_broker_audience": s.audience,
    }


def create_app(service: AuthService, clock: Clock) -> Starlette:
    async def metadata(request: Request) -> Response:
        return JSONResponse(metadata_document(service))

    async def jwks(request: Request) -> Response:
        service.keys.refresh(clock.now())  # the current set, even between two sweeps after `iotauth keys rotate`
        return JSONResponse(service.keys.jwks(), headers={"Cache-Control": "max-age=300"})

    async def health(request: Request) -> Response:
        try:
            stats = service.store.stats()
        except Exception as exc:  # the database is the one thing that can fail underneath us
            return JSONResponse({"status": "error", "detail": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", **stats})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    web = Web.create(service, clock)
    routes: list[BaseRoute] = [
        Route("/.well-known/oauth-authorization-server", metadata),
        Route("/.well-known/jwks.json", jwks),
        Route("/health", health),
        Route("/metrics", prometheus),
        *activate.routes(web),
        *admin.routes(web),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    # SecurityHeaders outermost, so the 413 of an oversized body carries them too
    middleware = [Middleware(SecurityHeaders), Middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY_BYTES)]
    return Starlette(routes=routes, middleware=middleware, exception_handlers=web.exception_handlers())
