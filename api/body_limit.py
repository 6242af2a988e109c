"""Request bodies larger than MAX_REQUEST_BYTES are refused with a 413 while they are read.

A plain ASGI middleware: a declared `Content-Length` over the limit is refused before the app runs;
a chunked body is counted as it arrives and refused as soon as it passes the limit, so no handler
ever holds more than the limit in memory. The rest of an oversized body is read and discarded
before answering, so the client (still uploading) receives the 413 instead of a reset connection.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.runtime.settings.max_request_bytes
        request = Request(scope)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _discard_rest(receive)
            await error_response(request, 413, _too_large(limit))(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await _discard_rest(receive)
                    # An HTTPException passes FastAPI's body parsing untouched and reaches the
                    # app's handler, which answers in the dialect's format.
                    raise HTTPException(413, _too_large(limit))
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:  # read outside FastAPI's handlers: answer here
                raise
            await error_response(request, 413, str(exc.detail))(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes (MAX_REQUEST_BYTES)"


async def _discard_rest(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
