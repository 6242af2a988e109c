"""The FastAPI app that BentoML mounts at "/": every route of every dialect."""

from __future__ import annotations

from fastapi import FastAPI

from api import anthropic, jobs, native, ollama, openai, responses, system
from api.auth import ApiKeyMiddleware
from api.body_limit import BodyLimitMiddleware
from api.errors import ErrorPolicyMiddleware, install_error_handlers
from api.json_body import JsonBodyMiddleware
from api.openapi_docs import DocumentedApp
from api.request_id import RequestIdMiddleware
from api.request_metrics import RequestMetricsMiddleware


def create_app() -> FastAPI:
    app = DocumentedApp(title="ai-server", docs_url="/docs", openapi_url="/openapi.json")
    # Each add wraps the ones before: the last added is the outermost.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware)  # inside the key check: strangers are refused before any upload
    app.add_middleware(ApiKeyMiddleware)
    app.add_middleware(ErrorPolicyMiddleware)  # the catch-all 500, counted and tagged by the two outside it
    app.add_middleware(RequestMetricsMiddleware)  # refused requests count too
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-ID
    install_error_handlers(app)
    for module in (native, system, jobs, ollama, openai, anthropic, responses):
        app.include_router(module.router)
    return app
