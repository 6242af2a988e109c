"""Error responses in each dialect's own format.

`/v1/messages*` answers with Anthropic's error object, the rest of `/v1/*` with OpenAI's; everything
else (native and Ollama) with `{"error": "..."}`, which is what Ollama clients parse.
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from errors import ServerError

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 503: "server_error"}


def openai_error(message: str, error_type: str, param: str | None = None) -> dict:
    """OpenAI's error object (also sent in-band when a stream fails after it began)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def error_response(
    request: Request, status: int, message: str, *, error_type: str | None = None, param: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else None
    if request.url.path.startswith("/v1/messages"):  # Anthropic's Messages API
        from api.anthropic_schemas import anthropic_error

        body = anthropic_error(status, message)
    elif request.url.path.startswith("/v1"):
        body = openai_error(message, error_type or _OPENAI_TYPES.get(status, "server_error"), param)
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(request, exc.status_code, exc.message, error_type=exc.error_type,
                              param=exc.param, retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = describe_validation_error(exc)
        return error_response(request, 400, message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail))
