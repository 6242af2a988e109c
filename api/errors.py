"""The one error policy of the HTTP edge: every failure answers in its dialect's own format.

- Dialects: `/v1/*` answers with OpenAI's error object; everything else (native and Ollama) with
  `{"error": "..."}`, which is what Ollama clients parse, and `/v1/messages*` with Anthropic's
  `{"type": "error", "error": {"type", "message"}}`. `dialect_of` is the one place that maps a
  path to its dialect, and `error_body` the one place that shapes a body.
- Known failures (`problem_of`): the server's own errors (errors.py) keep their status; a chat
  template that refuses the conversation (`raise_exception(...)` in the template, an undefined
  field) is the client's mistake: 400 with the template's own message (prompt preparation turns
  those into InvalidRequest already; this catches any that reach the edge another way).
- Anything else is unexpected: `ErrorPolicyMiddleware` logs it with its traceback and request id
  and answers 500 in the dialect's format, naming the request id.
- An error after a stream began (the 200 is sent) is reported in-band by `stream_error`, one
  helper for every dialect's framing, and logged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.request_id import current_request_id
from api.streaming import sse_event
from errors import ServerError

log = logging.getLogger(__name__)

Dialect = Literal["ollama", "openai", "anthropic"]  # "ollama" is also the native API's shape
StreamWire = Literal["ollama", "native", "openai"]  # NDJSON lines; SSE {"error", "done"}; SSE error object

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "server_error",
}


def dialect_of(path: str) -> Dialect:
    """Which dialect's error shape a path answers in (the hook for further dialects)."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1") else "ollama"


def openai_error(message: str, error_type: str, param: str | None = None) -> dict:
    """OpenAI's error object (also sent in-band when a stream fails after it began)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def error_body(
    dialect: Dialect, status: int, message: str, error_type: str | None = None, param: str | None = None
) -> dict:
    if dialect == "openai":
        return openai_error(message, error_type or _OPENAI_TYPES.get(status, "server_error"), param)
    if dialect == "anthropic":
        from api.anthropic_schemas import anthropic_error

        return anthropic_error(status, message)
    return {"error": message}


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else None
    dialect = dialect_of(request.url.path)
    body = error_body(dialect, status, message, error_type, param)
    if dialect == "anthropic" and status == 503:
        status = 529  # Anthropic's "overloaded" status, which its SDKs retry with backoff
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class Problem:
    """A known failure, ready to be answered: status, message and OpenAI's type and param."""

    status: int
    message: str
    error_type: str | None = None
    param: str | None = None
    retry_after: float | None = None


def problem_of(exc: BaseException) -> Problem | None:
    """The answer to a known failure; None when the failure is unexpected (a server bug, broken files)."""
    if isinstance(exc, ServerError):
        return Problem(exc.status_code, exc.message, exc.error_type, exc.param, exc.retry_after)
    if isinstance(exc, TemplateError):
        return Problem(
            400, str(exc) or "the model's chat template refused these messages", "invalid_request_error", "messages"
        )
    return None


def unexpected_message(exc: BaseException) -> str:
    return f"internal server error ({type(exc).__name__}: {exc}); request id {current_request_id()}"


def stream_error(exc: Exception, wire: StreamWire) -> str:
    """The last piece of a stream that failed after its first byte (the status is already sent),
    in the wire's own framing, with the failure logged under the request id. Ollama ends a stream
    with an `{"error"}` line; OpenAI's servers (vLLM) send an error object as an SSE event."""
    problem = problem_of(exc)
    if problem is None:
        log.error("stream failed after it began", exc_info=exc)
        problem = Problem(500, unexpected_message(exc), "server_error")
    else:
        log.warning("stream ended with an error (%d): %s", problem.status, problem.message)
    if wire == "ollama":
        return json.dumps({"error": problem.message}) + "\n"
    if wire == "native":
        return sse_event({"error": problem.message, "done": True})
    # Anthropic's /v1/messages would add its wire here: `event: error` + {"type": "error", "error": {...}}.
    return sse_event(error_body("openai", problem.status, problem.message, problem.error_type, problem.param))


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence naming the offending field (and that field, for OpenAI's `param`)."""
    problems, first_field = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}", None
        field = ".".join(loc)
        first_field = first_field or field or None
        problems.append(f"{field}: {err['msg']}" if field else err["msg"])
    return "invalid request: " + "; ".join(problems), first_field


class ErrorPolicyMiddleware:
    """The catch-all: an exception no handler knew becomes a logged 500 in the dialect's format.

    A plain ASGI middleware inside the request-id middleware (Starlette's own `Exception` handler
    runs outside every middleware, so its answer would carry no request id, and it re-raises, which
    logs the error twice). An exception after the response began can only end the connection: it
    is logged and re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            request = Request(scope)
            log.exception("unhandled error in %s %s", scope["method"], request.url.path)
            if started:
                raise
            response = error_response(request, 500, unexpected_message(exc), error_type="server_error")
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    @app.exception_handler(TemplateError)
    async def _known_error(request: Request, exc: Exception) -> JSONResponse:
        problem = problem_of(exc)
        assert problem is not None
        if problem.status >= 500:
            log.warning("%s %s failed (%d): %s", request.method, request.url.path, problem.status, problem.message)
        return error_response(
            request,
            problem.status,
            problem.message,
            error_type=problem.error_type,
            param=problem.param,
            retry_after=problem.retry_after,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = describe_validation_error(exc)
        return error_response(request, 400, message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))
