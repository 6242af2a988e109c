"""The Ollama responses this server sends, as pydantic models for /openapi.json (and /docs).

api/ollama.py builds its answers as dicts, so the bytes a client reads are exactly what it builds;
these models only describe them (named after the ollama client's own types). A field marked optional
may be absent: the statistics only on the last line of an answer, `thinking` only when the model
reasoned. A streamed answer is NDJSON: one of these objects per line, the last with `done: true`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from api.openapi_docs import ResponseModel

DoneReason = Literal["stop", "length", "cancelled", "load", "unload"]


class OllamaFinalStats(ResponseModel):
    """On the last line of a generation (durations in nanoseconds)."""

    done_reason: DoneReason | None = Field(None, description="load / unload: the answer to a request with no prompt")
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaToolCallFunction(ResponseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class OllamaToolCall(ResponseModel):
    id: str
    function: OllamaToolCallFunction


class OllamaMessage(ResponseModel):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = Field(None, description="each call whole, in one line of a stream")


class OllamaChatResponse(OllamaFinalStats):
    model: str
    created_at: str = Field(description="ISO-8601 UTC")
    message: OllamaMessage
    done: bool


class OllamaGenerateResponse(OllamaFinalStats):
    model: str
    created_at: str = Field(description="ISO-8601 UTC")
    response: str
    thinking: str | None = None
    done: bool


class OllamaEmbedResponse(ResponseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(ResponseModel):
    """The older /api/embeddings: one vector (empty when the request only loaded the model)."""

    embedding: list[float]


class OllamaModelDetails(ResponseModel):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str = Field(description="e.g. 7.2B, 494.0M")
    quantization_level: str = Field(description="e.g. BF16, NF4; in /api/ps the precision it was loaded in")


class OllamaModel(ResponseModel):
    name: str
    model: str
    modified_at: str = Field(description="ISO-8601 UTC")
    size: int = Field(description="bytes")
    digest: str = Field(description="the Hub commit of the snapshot")
    details: OllamaModelDetails


class OllamaTagsResponse(ResponseModel):
    models: list[OllamaModel]
    replica: str = Field(description="not Ollama's: which replica answered")


class OllamaRunningModel(OllamaModel):
    expires_at: str = Field(description="ISO-8601 UTC")
    size_vram: int
    context_length: int | None


class OllamaPsResponse(ResponseModel):
    models: list[OllamaRunningModel]
    replica: str = Field(description="not Ollama's: which replica answered")


class OllamaShowResponse(ResponseModel):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any] = Field(description="GGUF-style keys, e.g. llama.context_length")
    capabilities: list[str] = Field(description="completion, tools, thinking, vision, insert")
    modified_at: str = Field(description="ISO-8601 UTC")


class OllamaProgressResponse(ResponseModel):
    """/api/pull's answer: `success` at the end, and streamed, progress lines before it."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaVersionResponse(ResponseModel):
    version: str


class OllamaErrorResponse(ResponseModel):
    """Every failure outside /v1 carries this body (and a stream that fails late ends with it)."""

    error: str
