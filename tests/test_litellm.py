"""litellm against the real server (`bentoml serve` on a socket): its Ollama providers send JSON
without a Content-Type, and failed on every call before the server read any body as JSON.

Also over that real server: the request id of an unexpected error is in the server's own log.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.bodies import chat_body
from tests.support.server_process import UNREACHABLE_HUB, running_server
from tests.support.tiny_models import install_into_hf_cache

# litellm fetches its model price list from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm

MODEL = "test-org/tiny-llama"
BROKEN = "test-org/broken-template"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("litellm")
    install_into_hf_cache(tiny_llama_dir, root / "hf" / "hub", MODEL)
    broken = shutil.copytree(tiny_llama_dir, root / "broken")
    (broken / "chat_template.jinja").write_text("{{- bos_token + 1 -}}")  # rendering raises a TypeError
    install_into_hf_cache(broken, root / "hf" / "hub", BROKEN)
    env = {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
    }
    log = root / "server.log"
    with running_server(env, log) as url:
        yield url, log


@pytest.fixture(scope="module")
def url(server: tuple[str, Path]) -> str:
    return server[0]


def reference_answer(url: str) -> str:
    """The greedy 6-token answer, asked the server's own way."""
    body = {**chat_body(MODEL, "hello there"), "stream": False, "options": {"num_predict": 6, "temperature": 0}}
    return httpx.post(f"{url}/api/chat", json=body, timeout=120).json()["message"]["content"]


@pytest.mark.parametrize("provider", ["ollama_chat", "openai"])
def test_chat(url: str, provider: str) -> None:
    base = f"{url}/v1" if provider == "openai" else url
    r = litellm.completion(
        model=f"{provider}/{MODEL}", messages=MESSAGES, api_base=base, api_key="unused", max_tokens=6, temperature=0
    )
    assert r.choices[0].message.content == reference_answer(url)
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0


def test_ollama_generate_provider(url: str) -> None:
    """`ollama/` sends the messages as one prompt to /api/generate."""
    r = litellm.completion(model=f"ollama/{MODEL}", messages=MESSAGES, api_base=url, max_tokens=6, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 6


@pytest.mark.parametrize("provider", ["ollama_chat", "ollama", "openai"])
def test_stream(url: str, provider: str) -> None:
    base = f"{url}/v1" if provider == "openai" else url
    chunks = list(
        litellm.completion(
            model=f"{provider}/{MODEL}",
            messages=MESSAGES,
            api_base=base,
            api_key="unused",
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 2 and text
    if provider != "ollama":  # the same chat, so the same greedy answer
        assert text == reference_answer(url)


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_embedding(url: str, provider: str) -> None:
    base = f"{url}/v1" if provider == "openai" else url
    r = litellm.embedding(
        model=f"{provider}/{MODEL}", input=["the sky is blue", "grass is green"], api_base=base, api_key="unused"
    )
    vectors = [d["embedding"] for d in r.data]
    expected = httpx.post(
        f"{url}/api/embed", json={"model": MODEL, "input": ["the sky is blue", "grass is green"]}, timeout=120
    ).json()["embeddings"]
    assert len(vectors) == 2
    for vector, want in zip(vectors, expected, strict=True):
        assert vector == pytest.approx(want, abs=1e-5)


def test_unexpected_error_is_a_json_500_whose_request_id_is_in_the_server_log(server: tuple[str, Path]) -> None:
    """A model whose chat template raises a TypeError: the server's own fault, logged with the id."""
    url, log = server
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(BROKEN), timeout=120)
    assert r.status_code == 500
    request_id = r.headers["X-Request-ID"]
    assert f"request id {request_id}" in r.json()["error"]["message"]
    lines = log.read_text().splitlines()
    logged = [line for line in lines if f"[request_id={request_id}]" in line]
    assert any("unhandled error in POST /v1/chat/completions" in line for line in logged), lines[-30:]
    assert "TypeError: can only concatenate str" in log.read_text()
