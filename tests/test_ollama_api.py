"""The Ollama API with the official `ollama` client and LangChain's ChatOllama, against a real
`bentoml serve` that pulls from a local Hugging-Face-compatible hub."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest

from tests.support.hub_server import LocalHub
from tests.support.server_process import running_server

LLAMA = "test-org/tiny-llama"
GPT2 = "test-org/tiny-gpt2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("ollama")
    with LocalHub(root / "hub") as hub:
        hub.add_repo(LLAMA, tiny_llama_dir)
        hub.add_repo(GPT2, tiny_gpt2_dir)
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(root / "hf"),
            "DATA_DIR": str(root / "data"),
            "BENTOML_HOME": str(root / "bentoml"),
        }
        with running_server(env, root / "server.log") as url:
            yield url


@pytest.fixture(scope="module")
def client(server: str) -> ollama.Client:
    client = ollama.Client(host=server)
    assert client.pull(LLAMA).status == "success"  # the rest of the module chats with it
    return client


def test_pull_streams_byte_progress_then_success(server: str) -> None:
    updates = list(ollama.Client(host=server).pull(GPT2, stream=True))
    assert updates[0].status == "pulling manifest"
    progress = [u for u in updates if u.total]
    assert progress and progress[-1].completed == progress[-1].total > 0
    assert all(u.digest for u in progress)
    assert updates[-1].status == "success"
    assert f"{GPT2}:latest" in [m.model for m in ollama.Client(host=server).list().models]


def test_pull_of_an_unknown_repo_fails_with_the_reason(server: str) -> None:
    with pytest.raises(ollama.ResponseError, match="not found"):
        ollama.Client(host=server).pull("test-org/does-not-exist")


def test_list_and_show_describe_the_model(client: ollama.Client) -> None:
    [entry] = [m for m in client.list().models if m.model == f"{LLAMA}:latest"]
    assert entry.size > 0 and len(entry.digest) == 40 and entry.modified_at is not None
    assert entry.details.format == "safetensors" and entry.details.family == "llama"
    assert entry.details.parameter_size.endswith("K") and entry.details.quantization_level == "F32"

    shown = client.show(LLAMA)
    assert "completion" in shown.capabilities and "insert" in shown.capabilities
    assert "<|assistant|>" in shown.template
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 512
    assert shown.modelinfo["general.parameter_count"] > 100_000
    with pytest.raises(ollama.ResponseError) as err:
        client.show("test-org/missing")
    assert err.value.status_code == 404


def test_chat_plain_and_streamed_agree(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    options = {"temperature": 0, "num_predict": 12}
    whole = client.chat(LLAMA, messages=messages, options=options)
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 12 and whole.prompt_eval_count > 0
    assert whole.total_duration >= whole.eval_duration > 0

    parts = list(client.chat(LLAMA, messages=messages, options=options, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 12 and parts[-1].done_reason == "length"


def test_generate_with_system_raw_and_suffix(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 6}
    templated = client.generate(LLAMA, prompt="hello", system="be brief", options=options)
    raw = client.generate(LLAMA, prompt="hello", raw=True, options=options)
    assert templated.response and raw.response
    assert templated.prompt_eval_count > raw.prompt_eval_count  # the template wraps the prompt
    insert = client.generate(LLAMA, prompt="def f(x):", suffix="    return y", options=options)
    assert insert.done and insert.eval_count == 6
    client.pull(GPT2)
    with pytest.raises(ollama.ResponseError, match="insert") as err:  # gpt2 has no FIM tokens
        client.generate(GPT2, prompt="a", suffix="b", options=options)
    assert err.value.status_code == 400


def test_options_seed_stop_and_validation(client: ollama.Client) -> None:
    seeded = {"temperature": 1.0, "seed": 42, "num_predict": 10, "top_k": 0, "top_p": 1.0}
    first = client.generate(LLAMA, prompt="story", options=seeded).response
    assert client.generate(LLAMA, prompt="story", options=seeded).response == first
    assert client.generate(LLAMA, prompt="story", options={**seeded, "seed": 7}).response != first

    greedy = {"temperature": 0, "num_predict": 20}
    text = client.generate(LLAMA, prompt="hello", options=greedy).response
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.generate(LLAMA, prompt="hello", options={**greedy, "stop": [stop]})
    assert stopped.done_reason == "stop" and stop not in stopped.response
    assert text.startswith(stopped.response)

    # Options Ollama has but this server does not use are ignored; invalid values are rejected.
    assert client.generate(LLAMA, prompt="x", options={"num_predict": 1, "mirostat": 2, "num_ctx": 64}).done
    with pytest.raises(ollama.ResponseError, match="temperature") as err:
        client.generate(LLAMA, prompt="x", options={"temperature": "hot"})
    assert err.value.status_code == 400


def test_embed_returns_normalized_vectors(client: ollama.Client) -> None:
    result = client.embed(LLAMA, input=["the sky is blue", "grass is green", "the sky is blue"])
    vectors = result.embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 64  # the model's hidden size
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != pytest.approx(vectors[1])
    assert result.prompt_eval_count > 0
    short = client.embed(LLAMA, input="the sky is blue", dimensions=16).embeddings[0]
    assert len(short) == 16 and math.isclose(math.hypot(*short), 1.0, rel_tol=1e-4)
    legacy = client.embeddings(LLAMA, prompt="the sky is blue").embedding
    assert legacy == pytest.approx(vectors[0], abs=1e-5)


def test_embed_truncates_long_input_unless_told_not_to(client: ollama.Client) -> None:
    long_text = "the sky is blue " * 400  # far beyond the 512-token context
    cut = client.embed(LLAMA, input=long_text)  # Ollama's default: truncate to fit
    assert cut.prompt_eval_count == 512 and len(cut.embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError, match="context") as err:
        client.embed(LLAMA, input=long_text, truncate=False)
    assert err.value.status_code == 400


def test_ps_reports_loaded_models_and_keep_alive(client: ollama.Client) -> None:
    client.generate(LLAMA, prompt="x", options={"num_predict": 1}, keep_alive="10m")
    [entry] = [m for m in client.ps().models if m.model == f"{LLAMA}:latest"]
    assert entry.size > 0 and entry.size_vram == 0  # CPU
    expected = datetime.now(timezone.utc).timestamp() + 600
    assert abs(entry.expires_at.timestamp() - expected) < 30


def test_keep_alive_zero_unloads_after_the_request(client: ollama.Client) -> None:
    client.generate(LLAMA, prompt="x", options={"num_predict": 1})
    assert f"{LLAMA}:latest" in [m.model for m in client.ps().models]
    answer = client.generate(LLAMA, prompt="x", options={"num_predict": 1}, keep_alive=0)
    assert answer.done
    assert f"{LLAMA}:latest" not in [m.model for m in client.ps().models]
    assert client.generate(LLAMA).done_reason == "load"  # empty prompt: load
    unloaded = client.generate(LLAMA, keep_alive=0)  # empty prompt, keep_alive 0: unload
    assert unloaded.done_reason == "unload"
    assert f"{LLAMA}:latest" not in [m.model for m in client.ps().models]


def test_copy_makes_an_alias_and_delete_removes_it(client: ollama.Client) -> None:
    client.copy(LLAMA, "my-llama")
    names = [m.model for m in client.list().models]
    assert "my-llama:latest" in names and f"{LLAMA}:latest" in names
    options = {"temperature": 0, "num_predict": 5}
    assert (
        client.generate("my-llama", prompt="hi", options=options).response
        == client.generate(LLAMA, prompt="hi", options=options).response
    )
    client.delete("my-llama")
    names = [m.model for m in client.list().models]
    assert "my-llama:latest" not in names and f"{LLAMA}:latest" in names
    assert client.generate(LLAMA, prompt="hi", options=options).done  # the original still works
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("my-llama")
    assert err.value.status_code == 404


def test_unknown_model_raises_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="pull") as err:
        client.chat("test-org/never-pulled", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404


def test_ndjson_framing_and_final_statistics(client: ollama.Client, server: str) -> None:
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 8}}
    with httpx.stream("POST", f"{server}/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    *parts, final = lines
    assert all(set(p) == {"model", "created_at", "message", "done"} and p["done"] is False for p in parts)
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    for key in (
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert key in final
    assert final["eval_count"] == 8 and final["done_reason"] == "length"


def test_format_schema_output_is_valid_json(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
        "required": ["color", "bright"],
        "additionalProperties": False,
    }
    answer = client.chat(
        LLAMA,
        messages=[{"role": "user", "content": "pick a color"}],
        format=schema,
        options={"temperature": 0.8, "seed": 3, "num_predict": 64},
    )
    jsonschema.validate(json.loads(answer.message.content), schema)
    assert answer.done_reason == "stop"

    # "json" allows any object, and this random model often opens a string it never closes: of
    # several samples, every one starts an object, those that finish parse, and some finish.
    answers = [
        client.generate(LLAMA, prompt="json please", format="json", options={"num_predict": 16, "seed": seed})
        for seed in range(12)
    ]
    assert all(a.response.startswith("{") for a in answers)
    finished = [a.response for a in answers if a.done_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)


def test_version_and_root(server: str) -> None:
    assert httpx.get(f"{server}/api/version").json()["version"]
    assert httpx.get(f"{server}/").text == "Ollama is running"
    assert httpx.head(f"{server}/").status_code == 200


def test_langchain_chat_ollama(client: ollama.Client, server: str) -> None:
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model=LLAMA, base_url=server, temperature=0, num_predict=8)
    reply = chat.invoke("Hello there")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata["output_tokens"] == 8
    streamed = [chunk.content for chunk in chat.stream("Hello there")]
    assert len(streamed) > 1 and "".join(streamed) == reply.content


def test_errors_are_ollama_shaped(server: str) -> None:
    bad_json = httpx.post(f"{server}/api/chat", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    bad_keep_alive = httpx.post(f"{server}/api/generate", json={"model": LLAMA, "prompt": "x", "keep_alive": "soon"})
    assert bad_keep_alive.status_code == 400 and "keep_alive" in bad_keep_alive.json()["error"]
    bad_name = httpx.post(f"{server}/api/chat", json={"model": "../../x", "messages": []})
    assert bad_name.status_code == 400
    assert httpx.post(f"{server}/api/pull", json={"model": "a/b/c"}).status_code == 400
