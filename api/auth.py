"""API keys: when API_KEYS is set, every request but /health needs `Authorization: Bearer <key>`
(or `x-api-key: <key>`, how Anthropic clients send it).

A plain ASGI middleware (not BaseHTTPMiddleware), so streaming responses and client disconnects
pass through untouched.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response

_OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            request = Request(scope)
            keys: list[str] = scope["app"].state.runtime.settings.api_keys
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            token = token if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
            if keys and not _known(token, keys):
                message = "missing or invalid API key (Authorization: Bearer <key>, or x-api-key: <key>)"
                response = error_response(request, 401, message, error_type="authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _known(token: str, keys: list[str]) -> bool:
    """Constant-time comparison of bytes: compare_digest refuses str with non-ASCII characters, and
    a header may carry any byte (Starlette decodes headers as latin-1, which this undoes)."""
    presented = token.encode("latin-1")
    return any(hmac.compare_digest(presented, key.encode()) for key in keys)
