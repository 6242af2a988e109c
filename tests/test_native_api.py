"""The original server's API over HTTP: /chat (JSON and SSE), /models, /status, /health, /diag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bodies import chat_body

LLAMA = "test-org/tiny-llama"
GPT2 = "test-org/tiny-gpt2"


@pytest.fixture
def client(serve, install_model, tiny_llama_dir: Path, tiny_gpt2_dir: Path):
    install_model(tiny_llama_dir, LLAMA)
    install_model(tiny_gpt2_dir, GPT2)
    return serve()


def parse_sse(text: str) -> list[dict]:
    """Strict SSE parsing: every event is one `data: <json>` line followed by a blank line."""
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block.removeprefix("data: ")))
    return events


def test_chat_answers_in_ollama_shape(client) -> None:
    r = client.post("/chat", json=chat_body(LLAMA, max_tokens=8, temperature=0))
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == LLAMA
    assert body["created_at"].endswith("Z")
    assert body["message"]["role"] == "assistant"
    assert isinstance(body["message"]["content"], str)
    assert body["done"] is True
    assert body["done_reason"] in ("stop", "length")
    assert 1 <= body["eval_count"] <= 8
    assert body["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "eval_duration", "prompt_eval_duration"):
        assert isinstance(body[key], int) and body[key] >= 0
    assert body["total_duration"] >= body["load_duration"] > 0  # first request loaded the model


def test_max_tokens_is_honoured_and_counts_are_true(client) -> None:
    """Greedy decoding of this seeded model runs to the limit without hitting EOS."""
    body = client.post("/chat", json=chat_body(LLAMA, max_tokens=12, temperature=0)).json()
    assert body["done_reason"] == "length"
    assert body["eval_count"] == 12
    second = client.post("/chat", json=chat_body(LLAMA, max_tokens=12, temperature=0)).json()
    assert second["message"] == body["message"]  # temperature 0 is greedy: deterministic
    assert second["load_duration"] == 0  # already loaded


def test_prompt_eval_count_is_the_templated_prompt_length(client) -> None:
    from transformers import AutoTokenizer

    from runners.local_cache import find_local
    from runners.names import parse_model_name

    tokenizer = AutoTokenizer.from_pretrained(find_local(parse_model_name(LLAMA)).path)
    messages = [{"role": "user", "content": "count these tokens please"}]
    expected = len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    body = client.post("/chat", json={"model": LLAMA, "messages": messages, "max_tokens": 1}).json()
    assert body["prompt_eval_count"] == expected


def test_chat_streams_sse_events_matching_the_json_answer(client) -> None:
    request = chat_body(LLAMA, max_tokens=16, temperature=0)
    whole = client.post("/chat", json=request).json()
    r = client.post("/chat", json={**request, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    deltas, last = events[:-1], events[-1]
    assert len(deltas) >= 2
    assert all(e["done"] is False and set(e["delta"]) == {"content"} for e in deltas)
    assert last["done"] is True and last["delta"] == {}
    assert last["eval_count"] == whole["eval_count"]
    assert last["done_reason"] == whole["done_reason"]
    assert "".join(e["delta"]["content"] for e in deltas) == whole["message"]["content"]


def test_model_without_chat_template_uses_plain_prompt(client) -> None:
    body = client.post("/chat", json=chat_body(GPT2, max_tokens=5, temperature=0)).json()
    assert body["done"] is True and body["eval_count"] >= 1


def test_models_lists_cache_with_loaded_state(client, hf_hub_cache: Path) -> None:
    before = {m["model"]: m for m in client.get("/models").json()["models"]}
    assert set(before) == {LLAMA, GPT2}
    llama = before[LLAMA]
    assert llama["loaded"] is False and llama["backend"] is None and llama["quantization"] is None
    snapshot = Path(llama["local_path"])
    assert snapshot.is_relative_to(hf_hub_cache)
    assert llama["size_bytes"] == sum(p.stat().st_size for p in snapshot.iterdir())

    client.post("/chat", json=chat_body(LLAMA, max_tokens=1))
    after = {m["model"]: m for m in client.get("/models").json()["models"]}
    assert after[LLAMA]["loaded"] is True
    assert after[LLAMA]["backend"] == "transformers"
    assert after[LLAMA]["backend_reason"]
    assert after[LLAMA]["quantization"] == "fp32"  # CPU: full precision
    assert after[LLAMA]["load_duration"] > 0
    assert after[GPT2]["loaded"] is False


def test_status_health_and_diag(client) -> None:
    client.post("/chat", json=chat_body(LLAMA, max_tokens=1))
    status = client.get("/status").json()
    replica = status["replica"]  # which replica answered, the same name its pull jobs carry as owner
    assert replica and client.get("/api/ps").json()["replica"] == replica == client.get("/api/tags").json()["replica"]
    assert status["transformers_available"] is True and status["hf_hub_available"] is True
    assert isinstance(status["vllm_available"], bool) and isinstance(status["bitsandbytes_available"], bool)
    assert status["cache_size"] == 1 and status["cached_models"] == [LLAMA]
    assert status["max_cache"] == 2 and status["failed_loads"] == {}
    assert status["config"]["max_cache_models"] == 2
    assert status["config"]["cooldown_seconds"] == 300
    assert status["config"]["q4_threshold_bytes"] == 14_000_000_000

    health = client.get("/health").json()
    assert health["status"] == "healthy"
    assert health["models_cached"] == 1 and health["cache_limit"] == 2
    assert health["downloads_active"] == 0 and health["downloads_queued"] == 0
    assert health["cuda_available"] is False and health["gpu_status"] == "unavailable"
    assert health["uptime_seconds"] >= 0 and health["torch_version"]

    diag = client.get("/diag").json()
    assert diag == {
        "torch_installed": True,
        "torch_version": health["torch_version"],
        "cuda_available": False,
        "cuda_count": 0,
        "cuda_devices": [],
    }


# -- errors --------------------------------------------------------------------------------------


def test_unknown_model_is_404_saying_pull_first(client) -> None:
    r = client.post("/chat", json=chat_body("someone/not-pulled"))
    assert r.status_code == 404
    assert "pull" in r.json()["error"] and "someone/not-pulled" in r.json()["error"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "", "a/b/c", "org/..", "x" * 97, "org/name:bad tag", "/abs"])
def test_invalid_model_names_are_rejected_before_touching_disk(client, hf_hub_cache: Path, name: str) -> None:
    before = sorted(hf_hub_cache.rglob("*"))
    r = client.post("/chat", json=chat_body(name))
    assert r.status_code == 400
    assert "model" in r.json()["error"]
    assert sorted(hf_hub_cache.rglob("*")) == before


def test_malformed_json_is_400(client) -> None:
    r = client.post("/chat", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": LLAMA, "messages": "hi"}, "messages"),
        ({"model": LLAMA, "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": LLAMA, "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_wrong_field_types_name_the_field(client, body: dict, field: str) -> None:
    r = client.post("/chat", json=body)
    assert r.status_code == 400
    assert field in r.json()["error"]


def test_api_keys_guard_everything_but_health(serve, install_model, tiny_llama_dir: Path) -> None:
    install_model(tiny_llama_dir, LLAMA)
    client = serve(API_KEYS="k1,k2")
    assert client.get("/health").status_code == 200
    denied = client.get("/models")
    assert denied.status_code == 401 and "API key" in denied.json()["error"]
    assert client.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/chat", json=chat_body(LLAMA, max_tokens=1), headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200
