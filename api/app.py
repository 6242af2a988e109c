"""The FastAPI app that BentoML mounts at "/": every route of every dialect."""

from __future__ import annotations

from fastapi import FastAPI

from api import anthropic, jobs, native, ollama, openai, responses, system
from api.auth import ApiKeyMiddleware
from api.errors import install_error_handlers
from api.request_metrics import RequestMetricsMiddleware


def create_app() -> FastAPI:
    app = FastAPI(title="ai-server", docs_url="/docs", openapi_url="/openapi.json")
    app.add_middleware(ApiKeyMiddleware)
    app.add_middleware(RequestMetricsMiddleware)  # added last: outermost, so refused requests count too
    install_error_handlers(app)
    for module in (native, system, jobs, ollama, openai, anthropic, responses):
        app.include_router(module.router)
    return app
