"""Every request body is JSON, whatever its Content-Type says, as in Ollama (its handlers bind with
`ShouldBindJSON`, which ignores the header).

Ollama's own curl examples (`curl -d '{...}'` sends `application/x-www-form-urlencoded`) and
litellm's Ollama providers (no Content-Type at all) send JSON under other types; FastAPI would read
those bodies as bytes and answer 400 "Input should be a valid dictionary". Every endpoint of this
server that reads a body reads JSON, so the header is rewritten once here, before routing; a body
that is not JSON still gets FastAPI's "malformed JSON body" 400. A plain ASGI middleware (not
BaseHTTPMiddleware), so streaming passes through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = b"application/json"


def _is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == _JSON or media_type.endswith(b"+json")


class JsonBodyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            sent = [v for k, v in scope["headers"] if k == b"content-type"]
            if not sent or not _is_json(sent[0]):
                # In place: the middlewares outside read what the router records in this scope.
                others = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope["headers"] = [*others, (b"content-type", _JSON)]
        await self.app(scope, receive, send)
