"""The owner's overview: registered devices, their live grants, and a Revoke button per device.

GET  /admin          signed in: clients and live grants
POST /admin/revoke   client_id, csrf -> service.revoke_client (its live MQTT sessions are closed)
"""

from __future__ import annotations

import time
from collections import Counter

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsvc.web.pages import PageError, Web
from broker.acl import valid_identity


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def routes(web: Web) -> list[Route]:
    service = web.service

    def page(request: Request, notice: str | None = None) -> Response:
        clients = service.store.clients()
        grants = service.store.live_grants()
        per_client = Counter(g.client_id for g in grants)
        names = {c["client_id"]: c["name"] for c in clients}
        rows = [{"client_id": g.client_id, "name": names.get(g.client_id, g.client_id), "sub": g.sub,
                 "scope": g.scope, "since": utc(g.created)} for g in grants]
        return web.render(request, "admin.html", {"clients": clients, "grants": rows, "live": per_client,
                                                  "notice": notice})

    async def overview(request: Request) -> Response:
        web.require_user(request, "/admin")
        return page(request)

    async def revoke(request: Request) -> Response:
        fields = await web.posted(request)
        web.require_user(request, "/admin")
        client_id = fields.get("client_id", "")
        if not valid_identity(client_id):
            raise PageError("That is not a device ID.")
        count = service.revoke_client(client_id, web.now())
        notice = (f"Revoked {count} grant{'s' if count != 1 else ''} of {client_id}; its connections are closed."
                  if count else f"{client_id} had no live grants; nothing to revoke.")
        return page(request, notice)

    return [
        Route("/admin", overview, methods=["GET"]),
        Route("/admin/revoke", revoke, methods=["POST"]),
    ]
