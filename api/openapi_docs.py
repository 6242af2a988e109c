"""What /openapi.json (and so /docs) says each route answers: its JSON body, the events or lines of
its stream, and its dialect's error body.

The handlers build their answers as dicts and stream them as text, so the bytes clients read are
exactly what the handlers build, and FastAPI cannot see their shapes. A route declares them in its
`responses=` with `answers(...)` (and its router with `errors(...)`): pydantic models that describe,
and are never used to serialize. `DocumentedApp` completes the document: a declared JSON model
replaces the untyped object FastAPI infers from a handler's `dict` annotation, and the models of
stream events join the document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.streaming import NDJSON_MEDIA_TYPE, SSE_MEDIA_TYPE

_COMPONENTS = "#/components/schemas/"
_STREAM_MODELS: dict[str, type[BaseModel]] = {}  # every model a stream's pieces were declared with


class ResponseModel(BaseModel):
    """The base of the response models: every field the server sends is declared, so the schema
    says that no others come (`additionalProperties: false`)."""

    model_config = ConfigDict(extra="forbid")


def answers(model: type[BaseModel], *, stream: str | None = None, stream_model: type[BaseModel] | None = None) -> dict:
    """A route's 200: `model` as JSON and, for a route that streams, its pieces in `stream`'s media
    type (SSE: each event's data is a `stream_model`, default `model`; NDJSON: each line is one)."""
    content: dict[str, Any] = {}
    if stream is not None:
        piece = stream_model or model
        _STREAM_MODELS[piece.__name__] = piece
        ref = {"$ref": _COMPONENTS + piece.__name__}
        if stream == SSE_MEDIA_TYPE:
            data = {"type": "string", "contentMediaType": "application/json", "contentSchema": ref}
            item = {"type": "object", "properties": {"data": data}, "required": ["data"]}
            content[SSE_MEDIA_TYPE] = {"itemSchema": item}
        elif stream == NDJSON_MEDIA_TYPE:
            content[NDJSON_MEDIA_TYPE] = {"itemSchema": ref}
        else:
            raise ValueError(f"no stream documentation for {stream}")
    description = "the answer" + (f"; with `stream`, {stream}" if stream else "")
    return {200: {"model": model, "description": description, **({"content": content} if content else {})}}


def errors(model: type[BaseModel]) -> dict:
    """A dialect's error body for every 4xx and 5xx (FastAPI's 422 is not what this server answers:
    an invalid request is a 400 in the dialect's own format, api/errors.py)."""
    return {
        "4XX": {"model": model, "description": "the request cannot be served as it is"},
        "5XX": {"model": model, "description": "the server failed, or is busy (503, with Retry-After)"},
    }


class DocumentedApp(FastAPI):
    """FastAPI whose OpenAPI document carries the declared response models (see the module doc)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        document = super().openapi()
        _declared_bodies_only(document, self.routes)
        _add_stream_models(document)
        return document


def _declared_bodies_only(document: dict[str, Any], routes: list[Any]) -> None:
    """FastAPI merges a declared 200 model into the schema it infers from the handler's annotation
    (`{"type": "object", "additionalProperties": true}` for a dict): keep only the declared one."""
    for route in routes:
        if not isinstance(route, APIRoute) or "model" not in route.responses.get(200, {}):
            continue
        for method in route.methods:
            body = document["paths"][route.path_format][method.lower()]["responses"]["200"]["content"]
            schema = body["application/json"]["schema"]
            body["application/json"]["schema"] = {"$ref": schema["$ref"]}


def _add_stream_models(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "serialization") for model in _STREAM_MODELS.values()
    ]
    _, definitions = models_json_schema(pairs, ref_template=_COMPONENTS + "{model}")
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)  # a model the JSON bodies share is there already
