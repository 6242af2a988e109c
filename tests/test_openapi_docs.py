"""/openapi.json documents what the OpenAI and Ollama routes answer, and what they answer matches it.

The response models (api/openai_response_models.py, api/ollama_response_models.py) only describe:
the handlers build their dicts. So real answers of the real service app, JSON bodies, every SSE
event and NDJSON line and the error bodies, are validated against the schemas the document declares
(closed objects: a field the server sends that the document lacks fails too).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.support.fixtures import TINY_LLAMA

GREEDY = {"temperature": 0, "seed": 1}
OLLAMA_GREEDY = {"temperature": 0, "seed": 1, "num_predict": 4}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(serve, install_model, tiny_llama_dir):
    install_model(tiny_llama_dir, TINY_LLAMA)
    return serve(BACKEND="transformers")


@pytest.fixture
def document(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _declared(document: dict[str, Any], method: str, path: str, status: str, media_type: str) -> dict[str, Any]:
    """The schema `path` declares for `status` in `media_type`: a body's schema, a stream piece's."""
    content = document["paths"][path][method]["responses"][status]["content"][media_type]
    if media_type == "text/event-stream":
        return content["itemSchema"]["properties"]["data"]["contentSchema"]
    return content.get("schema") or content["itemSchema"]


def _check(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate with the document as the root, so `#/components/schemas/...` resolves."""
    jsonschema.validate(instance, {**schema, "components": document["components"]})


def test_the_main_routes_document_their_answers_streams_and_errors(document) -> None:
    expected = {
        ("post", "/v1/chat/completions"): ("ChatCompletion", "text/event-stream", "ChatCompletionChunk"),
        ("post", "/v1/completions"): ("Completion", "text/event-stream", "Completion"),
        ("post", "/v1/embeddings"): ("CreateEmbeddingResponse", None, None),
        ("get", "/v1/models"): ("ModelList", None, None),
        ("get", "/v1/models/{model}"): ("Model", None, None),
        ("post", "/api/chat"): ("OllamaChatResponse", "application/x-ndjson", "OllamaChatResponse"),
        ("post", "/api/generate"): ("OllamaGenerateResponse", "application/x-ndjson", "OllamaGenerateResponse"),
        ("post", "/api/embed"): ("OllamaEmbedResponse", None, None),
        ("post", "/api/embeddings"): ("OllamaEmbeddingsResponse", None, None),
        ("get", "/api/tags"): ("OllamaTagsResponse", None, None),
        ("get", "/api/ps"): ("OllamaPsResponse", None, None),
        ("post", "/api/show"): ("OllamaShowResponse", None, None),
        ("post", "/api/pull"): ("OllamaProgressResponse", "application/x-ndjson", "OllamaProgressResponse"),
        ("get", "/api/version"): ("OllamaVersionResponse", None, None),
    }
    schemas = document["components"]["schemas"]
    for (method, path), (body, stream, piece) in expected.items():
        responses = document["paths"][path][method]["responses"]
        assert _declared(document, method, path, "200", "application/json") == {"$ref": f"#/components/schemas/{body}"}
        if stream is not None:
            assert _declared(document, method, path, "200", stream) == {"$ref": f"#/components/schemas/{piece}"}
        error = "OpenAIErrorResponse" if path.startswith("/v1") else "OllamaErrorResponse"
        for status in ("4XX", "5XX"):
            assert _declared(document, method, path, status, "application/json") == {
                "$ref": f"#/components/schemas/{error}"
            }
        assert "422" not in responses, f"{path}: invalid requests are 400s in the dialect's format, not 422s"
        for name in {body, piece, error} - {None}:
            assert schemas[name]["type"] == "object" and schemas[name]["properties"], name


def _sse_events(text: str) -> list[Any]:
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_openai_answers_match_their_documented_schemas(client, document) -> None:
    def check(method: str, path: str, response, status: str = "200") -> None:
        assert status != "200" or response.status_code == 200, response.text
        _check(document, _declared(document, method, path, status, "application/json"), response.json())

    chat = {"model": TINY_LLAMA, "messages": HELLO, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, **GREEDY}
    check("post", "/v1/chat/completions", client.post("/v1/chat/completions", json={**chat, "n": 2}))
    streamed = client.post(
        "/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunk = _declared(document, "post", "/v1/chat/completions", "200", "text/event-stream")
    events = _sse_events(streamed.text)
    assert events[-1]["usage"] is not None and events[-1]["choices"] == []
    for event in events:
        _check(document, chunk, event)

    text = {"model": TINY_LLAMA, "prompt": "hello", "max_tokens": 4, "logprobs": 2, **GREEDY}
    check("post", "/v1/completions", client.post("/v1/completions", json=text))
    piece = _declared(document, "post", "/v1/completions", "200", "text/event-stream")
    for event in _sse_events(client.post("/v1/completions", json={**text, "stream": True}).text):
        _check(document, piece, event)

    for encoding in ("float", "base64"):
        body = {"model": TINY_LLAMA, "input": ["a", "b"], "encoding_format": encoding}
        check("post", "/v1/embeddings", client.post("/v1/embeddings", json=body))
    check("get", "/v1/models", client.get("/v1/models"))
    check("get", "/v1/models/{model}", client.get(f"/v1/models/{TINY_LLAMA}"))

    missing = client.get("/v1/models/test-org/absent")
    assert missing.status_code == 404
    check("get", "/v1/models/{model}", missing, "4XX")
    invalid = client.post("/v1/chat/completions", json={"model": TINY_LLAMA, "messages": HELLO, "n": 0})
    assert invalid.status_code == 400
    check("post", "/v1/chat/completions", invalid, "4XX")


def test_ollama_answers_match_their_documented_schemas(client, document) -> None:
    def check(method: str, path: str, response, status: str = "200") -> dict[str, Any]:
        assert status != "200" or response.status_code == 200, response.text
        _check(document, _declared(document, method, path, status, "application/json"), response.json())
        return response.json()

    def check_lines(path: str, response) -> None:
        line = _declared(document, "post", path, "200", "application/x-ndjson")
        lines = [json.loads(text) for text in response.text.splitlines()]
        assert lines[-1]["done"] is True
        for each in lines:
            _check(document, line, each)

    chat = {"model": TINY_LLAMA, "messages": HELLO, "options": OLLAMA_GREEDY}
    check("post", "/api/chat", client.post("/api/chat", json={**chat, "stream": False}))
    check_lines("/api/chat", client.post("/api/chat", json=chat))
    loaded = check("post", "/api/chat", client.post("/api/chat", json={"model": TINY_LLAMA, "messages": []}))
    assert loaded["done_reason"] == "load"

    generate = {"model": TINY_LLAMA, "prompt": "hello", "options": OLLAMA_GREEDY}
    check("post", "/api/generate", client.post("/api/generate", json={**generate, "stream": False}))
    check_lines("/api/generate", client.post("/api/generate", json=generate))

    check("post", "/api/embed", client.post("/api/embed", json={"model": TINY_LLAMA, "input": ["a", "b"]}))
    check("post", "/api/embeddings", client.post("/api/embeddings", json={"model": TINY_LLAMA, "prompt": "a"}))
    assert check("get", "/api/tags", client.get("/api/tags"))["models"]
    assert check("get", "/api/ps", client.get("/api/ps"))["models"]  # loaded by the requests above
    check("post", "/api/show", client.post("/api/show", json={"model": TINY_LLAMA}))
    check("get", "/api/version", client.get("/api/version"))

    missing = client.post("/api/show", json={"model": "test-org/absent"})
    assert missing.status_code == 404
    check("post", "/api/show", missing, "4XX")
