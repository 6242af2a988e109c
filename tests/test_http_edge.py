"""The HTTP edge, in-process through the service's own ASGI app: bodies under any Content-Type (as
curl and litellm send them), request ids, and errors in each dialect's own shape."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.support.bodies import chat_body

MODEL = "test-org/tiny-llama"
STRICT = "test-org/strict-template"  # a chat template that refuses non-alternating roles
BROKEN = "test-org/broken-template"  # a chat template that fails with a Python error, not a template error

# The check Llama-2's and Mistral's templates make, raising through transformers' `raise_exception`.
ALTERNATING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
BROKEN_TEMPLATE = "{{- bos_token + 1 -}}{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"


def with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.fixture
def client(serve, install_model, tiny_llama_dir: Path, tmp_path: Path):
    install_model(tiny_llama_dir, MODEL)
    install_model(with_template(tiny_llama_dir, tmp_path / "strict", ALTERNATING_TEMPLATE), STRICT)
    install_model(with_template(tiny_llama_dir, tmp_path / "broken", BROKEN_TEMPLATE), BROKEN)
    return serve()


# -- bodies under any Content-Type ------------------------------------------------------------------

BODIES = {
    "/api/chat": {**chat_body(MODEL), "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/api/show": {"model": MODEL},
    "/api/embed": {"model": MODEL, "input": "the sky is blue"},
    "/v1/chat/completions": {**chat_body(MODEL), "max_tokens": 2},
}
CONTENT_TYPES = {
    "none": {},  # litellm's Ollama providers
    "text/plain": {"Content-Type": "text/plain"},
    "form": {"Content-Type": "application/x-www-form-urlencoded"},  # curl -d, as in Ollama's docs
}


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("path", BODIES)
def test_json_body_is_read_whatever_the_content_type(client, path: str, content_type: str) -> None:
    r = client.post(path, content=json.dumps(BODIES[path]).encode(), headers=CONTENT_TYPES[content_type])
    assert r.status_code == 200, r.text
    body = r.json()
    expected_key = {
        "/api/chat": "message",
        "/api/generate": "response",
        "/api/show": "capabilities",
        "/api/embed": "embeddings",
        "/v1/chat/completions": "choices",
    }[path]
    assert body[expected_key]


@pytest.mark.parametrize("content_type", ["none", "text/plain", "form"])
def test_invalid_json_is_still_a_400_in_the_dialects_shape(client, content_type: str) -> None:
    headers = CONTENT_TYPES[content_type]
    ollama = client.post("/api/chat", content=b'{"model": "x", "messages": [', headers=headers)
    assert ollama.status_code == 400 and ollama.json()["error"].startswith("malformed JSON body")
    openai = client.post("/v1/chat/completions", content=b"model=x&messages=y", headers=headers)
    assert openai.status_code == 400
    error = openai.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("malformed JSON body")


# -- request ids -------------------------------------------------------------------------------------


def test_every_response_carries_a_request_id(client) -> None:
    ids = {client.get("/api/version").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert client.post("/api/show", json={"model": "nobody/nothing"}).headers["X-Request-ID"]  # errors too
    sent = client.get("/api/tags", headers={"X-Request-ID": "trace-42.abc"})
    assert sent.headers["X-Request-ID"] == "trace-42.abc"
    unusable = client.get("/api/tags", headers={"X-Request-ID": "a b\tc%d"})  # would break a log line
    assert len(unusable.headers["X-Request-ID"]) == 32


def test_refused_requests_carry_a_request_id(serve) -> None:
    client = serve(API_KEYS="secret")
    refused = client.get("/v1/models", headers={"X-Request-ID": "who-am-i"})
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "who-am-i"
    assert refused.json()["error"]["type"] == "authentication_error"
    unknown = client.get("/v1/models/nobody/nothing", headers={"Authorization": "Bearer secret"})
    assert unknown.status_code == 404 and unknown.headers["X-Request-ID"]


def test_streams_carry_the_request_id(client) -> None:
    with client.stream(
        "POST",
        "/api/chat",
        json={**chat_body(MODEL), "options": {"num_predict": 3}},
        headers={"X-Request-ID": "stream-1"},
    ) as r:
        assert r.headers["X-Request-ID"] == "stream-1"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True


# -- template errors are the client's 400 -------------------------------------------------------

NOT_ALTERNATING = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
TEMPLATE_MESSAGE = "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.mark.parametrize("stream", [False, True])
def test_a_template_that_raises_is_a_400_in_each_dialect(client, stream: bool) -> None:
    ollama = client.post("/api/chat", json={"model": STRICT, "messages": NOT_ALTERNATING, "stream": stream})
    assert ollama.status_code == 400 and list(ollama.json()) == ["error"] and TEMPLATE_MESSAGE in ollama.json()["error"]

    native = client.post("/chat", json={"model": STRICT, "messages": NOT_ALTERNATING, "stream": stream})
    assert native.status_code == 400 and list(native.json()) == ["error"] and TEMPLATE_MESSAGE in native.json()["error"]

    openai = client.post("/v1/chat/completions", json={"model": STRICT, "messages": NOT_ALTERNATING, "stream": stream})
    assert openai.status_code == 400
    error = openai.json()["error"]
    assert TEMPLATE_MESSAGE in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "messages", None)
    # The same model answers a conversation its template accepts.
    fine = client.post(
        "/api/chat",
        json={"model": STRICT, "messages": NOT_ALTERNATING[:1], "stream": False, "options": {"num_predict": 2}},
    )
    assert fine.status_code == 200, fine.text


# -- the unexpected: a JSON 500 whose request id is in the log ---------------------------------------


def test_an_unexpected_error_is_a_logged_json_500_naming_the_request_id(client, caplog) -> None:
    """A model whose chat template adds a number to a string: rendering raises a TypeError, which no
    handler expects (it is the model's fault, not the client's)."""
    caplog.set_level(logging.ERROR)
    ollama = client.post(
        "/api/chat", json={**chat_body(BROKEN), "stream": False}, headers={"X-Request-ID": "req-ollama"}
    )
    assert ollama.status_code == 500 and ollama.headers["X-Request-ID"] == "req-ollama"
    assert "TypeError" in ollama.json()["error"] and "request id req-ollama" in ollama.json()["error"]

    openai = client.post("/v1/chat/completions", json=chat_body(BROKEN))
    request_id = openai.headers["X-Request-ID"]
    assert openai.status_code == 500
    error = openai.json()["error"]
    assert error["type"] == "server_error" and f"request id {request_id}" in error["message"]

    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert {"req-ollama", request_id} <= {getattr(r, "x_request_id", None) for r in logged}
    assert any(f"[request_id={request_id}]" in r.getMessage() and r.exc_info[0] is TypeError for r in logged)


# -- an error after the stream began: one helper, each dialect's framing, logged ------------------


def test_a_failure_mid_stream_ends_each_dialects_stream_in_its_framing_and_is_logged(
    serve,
    install_model,
    tmp_path: Path,
    caplog,
) -> None:
    from tests.support.tiny_models import build_remote_code_model
    from tests.test_openai_api import _FAULTY_MODELING

    src = build_remote_code_model(tmp_path / "faulty")
    (src / "modeling_custom.py").write_text(_FAULTY_MODELING)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "fail_after": 16}))
    install_model(src, "test-org/faulty")
    client = serve(TRUST_REMOTE_CODE_MODELS="test-org/faulty")
    caplog.set_level(logging.ERROR)
    messages = [{"role": "user", "content": "hello"}]

    def stream(path: str, body: dict, request_id: str) -> list[str]:
        with client.stream(
            "POST",
            path,
            json={"model": "test-org/faulty", "messages": messages, "stream": True, **body},
            headers={"X-Request-ID": request_id},
        ) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    ollama = [json.loads(line) for line in stream("/api/chat", {"options": {"num_predict": 50}}, "mid-ollama")]
    assert ollama[0]["message"]["content"] and "done" not in ollama[-1]
    assert "simulated device fault" in ollama[-1]["error"] and "request id mid-ollama" in ollama[-1]["error"]

    native = [json.loads(line.removeprefix("data: ")) for line in stream("/chat", {"max_tokens": 50}, "mid-native")]
    assert native[0]["delta"]["content"] and native[-1]["done"] is True
    assert "simulated device fault" in native[-1]["error"]

    openai = stream("/v1/chat/completions", {"max_tokens": 50}, "mid-openai")
    error = json.loads(openai[-1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "simulated device fault" in error["message"]

    logged = {
        getattr(r, "x_request_id", None) for r in caplog.records if r.exc_info and "simulated" in str(r.exc_info[1])
    }
    assert {"mid-ollama", "mid-native", "mid-openai"} <= logged
