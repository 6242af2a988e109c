"""What route handlers need from the running server."""

from __future__ import annotations

from fastapi import Request

from runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime
