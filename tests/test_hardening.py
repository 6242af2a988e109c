"""Hostile input against the real service app in-process: request size, numeric options, odd
strings and headers in every dialect. None may answer 5xx or disturb the next request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import chat_body

LLAMA = "test-org/tiny-llama"


@pytest.fixture
def client(serve, install_model, tiny_llama_dir: Path):
    install_model(tiny_llama_dir, LLAMA)
    return serve(MAX_REQUEST_BYTES="1000000")


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body without Content-Length (sent chunked): the limit must be enforced as it arrives."""
    yield b'{"model": "x", "prompt": "'
    sent = 0
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


# -- request size --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/generate", "/chat"])
def test_a_body_over_the_limit_is_413_in_ollama_format(client, path: str) -> None:
    r = client.post(path, json=chat_body(LLAMA, "a" * 2_000_000, prompt="x"))
    assert r.status_code == 413
    assert "MAX_REQUEST_BYTES" in r.json()["error"]
    assert client.get("/api/version").status_code == 200  # the server carries on


def test_a_body_over_the_limit_is_413_in_openai_format(client) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(LLAMA, "a" * 2_000_000))
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "1000000 bytes" in r.json()["error"]["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(client) -> None:
    r = client.post("/v1/completions", content=_chunks(3_000_000), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/api/generate", content=_chunks(3_000_000), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["error"]


def test_a_body_under_the_limit_is_served(client) -> None:
    r = client.post("/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False,
                                           "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["done"] is True


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing(client) -> None:
    """900 kB fits the body limit; the tiny llama's 512-token context cannot hold it whatever its
    tokens: refused by its length in characters (tokenizing it first is what took minutes)."""
    r = client.post("/api/generate", json={"model": LLAMA, "prompt": "b" * 900_000, "stream": False})
    assert r.status_code == 400 and "characters" in r.json()["error"]
    r = client.post("/v1/completions", json={"model": LLAMA, "prompt": "b" * 900_000})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    # Embeddings that may be truncated are cut, not refused.
    r = client.post("/api/embed", json={"model": LLAMA, "input": "b" * 900_000})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] <= 512
