"""Counts every HTTP request by route template and status code (metrics.py's `requests_total`).

A plain ASGI middleware (not BaseHTTPMiddleware), so streaming responses and client disconnects
pass through untouched.
"""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import metrics


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # a handler that fails before starting a response

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, remember_status)
        finally:
            metrics.record_request(_endpoint(scope), scope["method"], status)


def _endpoint(scope: Scope) -> str:
    """The route template (`/jobs/{job_id}`, not every id), so label values stay few. A request
    refused before routing (401) is matched here. (BentoML answers paths no route serves itself.)"""
    routes = scope["app"].router.routes
    route = scope.get("route")  # set by our router; until then, BentoML's mount of this app
    if route not in routes:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"
