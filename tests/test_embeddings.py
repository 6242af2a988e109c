"""Embeddings go through the same admission limit as generation (MAX_BATCH_SIZE + MAX_QUEUE per
model, 503 with Retry-After beyond it), counted together with the generations running on the model.
In-process through the service's own app, on the transformers engine. (Embeddings of models that
generate on vLLM: tests/test_vllm.py.)"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import pytest

from tests.support.tiny_models import build_tiny_llama

MODEL = "test-org/long-context-llama"
CONTEXT = 16384  # a generation long enough (~16k tokens) to still be running while the test looks


@pytest.fixture(scope="module")
def long_context_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("long-context"), context=CONTEXT)


@pytest.fixture
def model(install_model, long_context_llama: Path) -> str:
    install_model(long_context_llama, MODEL)
    return MODEL


def test_embeddings_count_with_the_generations_running_on_the_model(serve, model: str) -> None:
    client = serve(MAX_BATCH_SIZE="1", MAX_QUEUE="0")
    body = {"model": model, "prompt": "go on", "max_tokens": CONTEXT // 2, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as held:
        assert held.status_code == 200  # decoding ~8k tokens (seconds): the model's one place is taken
        [entry] = client.get("/status").json()["loaded_models"]
        assert entry["running_requests"] == 1
        ollama = client.post("/api/embed", json={"model": model, "input": "the sky is blue"})
        assert ollama.status_code == 503 and ollama.headers["Retry-After"] == "1"
        assert "MAX_BATCH_SIZE=1, MAX_QUEUE=0" in ollama.json()["error"]
        openai = client.post("/v1/embeddings", json={"model": model, "input": "the sky is blue"})
        assert openai.status_code == 503 and openai.json()["error"]["type"] == "server_error"
    # The generation ends (the in-process client does not always pass the disconnect on), and the
    # model has room again.
    deadline = time.monotonic() + 180
    while client.get("/status").json()["loaded_models"][0]["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    r = client.post("/api/embed", json={"model": model, "input": "the sky is blue"})
    assert r.status_code == 200 and math.isclose(sum(x * x for x in r.json()["embeddings"][0]), 1.0, rel_tol=1e-5)


def test_thirty_concurrent_embed_requests_do_not_all_run_at_once(serve, model: str) -> None:
    """Before admission, all 30 ran at once in threads (and a short chat beside them took 100x
    longer). Now one runs, one waits, the others get 503 with Retry-After, and the answers that are
    given are the same vectors a lone request gets."""
    client = serve(MAX_BATCH_SIZE="1", MAX_QUEUE="1")
    texts = [f"sentence number {i} " * 60 for i in range(16)]  # a batch that takes a while to embed
    alone = client.post("/api/embed", json={"model": model, "input": texts})
    assert alone.status_code == 200
    start = Barrier(30)

    def embed(_: int):
        start.wait()
        return client.post("/api/embed", json={"model": model, "input": texts})

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(embed, range(30)))
    busy = [r for r in answers if r.status_code == 503]
    done = [r for r in answers if r.status_code == 200]
    assert len(busy) + len(done) == 30, [r.text for r in answers if r.status_code not in (200, 503)]
    assert busy and done
    assert all(r.headers["Retry-After"] == "1" and "server busy" in r.json()["error"] for r in busy)
    for r in done:
        for got, want in zip(r.json()["embeddings"], alone.json()["embeddings"], strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    assert json.loads(client.get("/status").text)["loaded_models"][0]["running_requests"] == 0
