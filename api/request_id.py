"""A request id on every response (`X-Request-ID`) and in every log line written while serving it.

The id is the client's own `X-Request-ID` when it sends a usable one (so a proxy's or a client's
id ties their logs to ours), else a fresh one. It lives in a contextvar: asyncio tasks and
`asyncio.to_thread` copy the context, so lines logged by the pool, a load or a runner during the
request carry it too. A plain ASGI middleware (not BaseHTTPMiddleware), so streaming passes through.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/=+-]{1,128}")  # nothing that could break a header or a log line
_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context, or None outside a request."""
    return _current.get()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        request_id = sent if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
        token = _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.lower().encode()]
                message = {**message, "headers": [*headers, (HEADER.lower().encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Puts the request id on each record (`record.x_request_id`; BentoML's own filter owns
    `record.request_id`) and at the end of its message.

    Installed on handlers, so it reaches every logger that writes through them (ours, uvicorn's,
    vLLM's) whatever format the handler uses. A record passes each handler's filter once per handler:
    the id is appended only the first time.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "x_request_id"):
            request_id = _current.get()
            record.__dict__["x_request_id"] = request_id  # an extra attribute, as logging's `extra=` sets them
            if request_id is not None:
                record.msg = f"{record.msg} [request_id={request_id}]"
        return True


_FILTER = RequestIdLogFilter()


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (default: the root logger) that lacks it.

    Called when the service starts, after BentoML has configured logging in the worker."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
            handler.addFilter(_FILTER)
