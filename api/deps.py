"""What route handlers need from the running server."""

from __future__ import annotations

from fastapi import Request

from runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    # (18% of the serving process's busy samples when 8 short requests start at once).
    return request.app.state.runtime
