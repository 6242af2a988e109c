"""Hostile input against the real service app in-process: request size, numeric options, odd
strings and headers in every dialect. None may answer 5xx or disturb the next request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bodies import chat_body

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
    r = client.post(
        "/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    )
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


# -- numbers, strings and headers ----------------------------------------------------------------


def _raw(client, path: str, body: str, **headers: str):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json", **headers})


def _ollama_error(r) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    return r.json()["error"]


def _openai_error(r) -> dict:
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["type"] == "invalid_request_error"
    return r.json()["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_malformed_json_in_every_dialect(client, literal: str) -> None:
    """Python's json accepts these; JSON does not, and they once reached the sampler (a NaN
    penalty aborted every request in the batch)."""
    msg = '[{"role": "user", "content": "hi"}]'
    assert "JSON" in _ollama_error(
        _raw(
            client,
            "/api/chat",
            f'{{"model": "{LLAMA}", "messages": {msg}, "options": {{"repeat_penalty": {literal}}}}}',
        )
    )
    body = f'{{"model": "{LLAMA}", "messages": {msg}, "temperature": {literal}}}'
    assert "JSON" in _openai_error(_raw(client, "/v1/chat/completions", body))["message"]
    assert "JSON" in _ollama_error(
        _raw(client, "/chat", f'{{"model": "{LLAMA}", "messages": {msg}, "temperature": {literal}}}')
    )
    assert "JSON" in _ollama_error(_raw(client, "/api/generate", f'{{"model": "{LLAMA}", "keep_alive": {literal}}}'))
    assert client.get("/api/version").status_code == 200


@pytest.mark.parametrize("text", ["NaN", "inf", "-Infinity"])
def test_non_finite_numbers_spelled_as_strings_are_refused(client, text: str) -> None:
    assert "temperature" in _ollama_error(
        client.post("/api/generate", json={"model": LLAMA, "prompt": "hi", "options": {"temperature": text}})
    )
    r = client.post("/v1/completions", json={"model": LLAMA, "prompt": "hi", "top_p": text})
    assert _openai_error(r)["param"] == "top_p"
    assert "keep_alive" in _ollama_error(client.post("/api/generate", json={"model": LLAMA, "keep_alive": text}))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("seed", 2**70),
        ("seed", -(2**70)),
        ("top_k", 2**40),
        ("presence_penalty", 1e300),
        ("frequency_penalty", -3),
        ("repeat_penalty", 1e-300),
        ("repeat_penalty", 50),
        ("top_p", 0),
        ("min_p", 1.5),
        ("temperature", -1),
    ],
)
def test_ollama_options_out_of_range_are_400_naming_them(client, option: str, value: float) -> None:
    r = client.post("/api/generate", json={"model": LLAMA, "prompt": "hi", "stream": False, "options": {option: value}})
    assert option in _ollama_error(r)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**70),
        ("top_k", 2**40),
        ("repetition_penalty", 1e-300),
        ("temperature", 3),
        ("n", 1000),
    ],
)
def test_openai_fields_out_of_range_are_400_naming_them(client, field: str, value: float) -> None:
    assert _openai_error(client.post("/v1/chat/completions", json=chat_body(LLAMA, **{field: value})))["param"] == field


def test_n_that_could_never_run_is_400_not_busy(client) -> None:
    """MAX_BATCH_SIZE 16 + MAX_QUEUE 64: 81 samples can never be admitted, so it is not a 503 to retry."""
    r = client.post("/v1/completions", json={"model": LLAMA, "prompt": "hi", "n": 81, "max_tokens": 1})
    error = _openai_error(r)
    assert error["param"] == "n" and "MAX_BATCH_SIZE" in error["message"]
    error = _openai_error(client.post("/v1/completions", json={"model": LLAMA, "prompt": ["a", "b", "c"], "n": 30}))
    assert "90 sequences" in error["message"]


def test_the_largest_seed_wraps_for_the_second_sample(client) -> None:
    r = client.post(
        "/v1/completions", json={"model": LLAMA, "prompt": "hi", "n": 2, "max_tokens": 3, "seed": 2**63 - 1}
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_a_tiny_temperature_is_greedy(client) -> None:
    """Dividing logits by 1e-300 overflows to inf and NaN probabilities; below 1e-5 means greedy."""

    def text(temperature: float) -> str:
        r = client.post(
            "/api/generate",
            json={
                "model": LLAMA,
                "prompt": "hi",
                "stream": False,
                "options": {"temperature": temperature, "num_predict": 6},
            },
        )
        assert r.status_code == 200, r.text
        return r.json()["response"]

    assert text(1e-300) == text(0)


@pytest.mark.parametrize("keep_alive", [1e20, "99999999h", 2**70])
def test_an_enormous_keep_alive_means_forever_and_ps_still_answers(client, keep_alive: object) -> None:
    r = client.post("/api/generate", json={"model": LLAMA, "keep_alive": keep_alive})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    ps = client.get("/api/ps")
    assert ps.status_code == 200
    [entry] = ps.json()["models"]
    assert entry["expires_at"].startswith("2318-")  # Ollama's "never"
    # A negative keep_alive is forever too; a long but real one expires when it says.
    client.post("/api/generate", json={"model": LLAMA, "keep_alive": "2400h"})
    assert client.get("/api/ps").json()["models"][0]["expires_at"][:4] != "2318"


def test_a_lone_surrogate_in_a_message_is_400(client) -> None:
    surrogate = r'"\ud800 hi"'
    messages = f'[{{"role": "user", "content": {surrogate}}}]'
    assert "surrogate" in _ollama_error(_raw(client, "/api/chat", f'{{"model": "{LLAMA}", "messages": {messages}}}'))
    assert (
        "surrogate"
        in _openai_error(_raw(client, "/v1/chat/completions", f'{{"model": "{LLAMA}", "messages": {messages}}}'))[
            "message"
        ]
    )
    assert "surrogate" in _ollama_error(_raw(client, "/chat", f'{{"model": "{LLAMA}", "messages": {messages}}}'))
    # A proper pair is a character, and welcome.
    pair = r'"\ud83d\ude00"'
    r = _raw(
        client,
        "/api/generate",
        f'{{"model": "{LLAMA}", "prompt": {pair}, "stream": false, "options": {{"num_predict": 1}}}}',
    )
    assert r.status_code == 200, r.text


def test_a_non_ascii_authorization_header_is_401(serve, install_model, tiny_llama_dir: Path) -> None:
    install_model(tiny_llama_dir, LLAMA)
    client = serve(API_KEYS="secret")
    r = client.get("/api/tags", headers={"Authorization": b"Bearer s\xe9cret\xff"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = client.get("/v1/models", headers={"Authorization": b"Bearer \xff"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/api/tags", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_pulling_a_repo_that_does_not_exist_is_404(serve, local_hub) -> None:
    client = serve()
    r = client.post("/api/pull", json={"model": "test-org/does-not-exist", "stream": False})
    assert r.status_code == 404 and "not found" in r.json()["error"]


# -- a failing row leaves the batch --------------------------------------------------------------

# A string pattern nothing can match: the schema compiles, and the output runs into a dead end a few
# tokens in (after `{"a":"x`), in the middle of decoding: a real per-row failure at run time.
DEAD_END = {"type": "object", "properties": {"a": {"type": "string", "pattern": "x[^\\s\\S]"}}, "required": ["a"]}


def test_a_row_that_fails_leaves_the_batch_and_the_others_finish_as_alone(
    serve, install_model, tiny_llama_dir: Path
) -> None:
    from tests.support.server_process import current_runtime

    install_model(tiny_llama_dir, LLAMA)
    client = serve(BACKEND="transformers")

    def generate(prompt: str, results: dict[str, object] | None = None, **extra: object) -> object:
        r = client.post(
            "/api/generate",
            json={
                "model": LLAMA,
                "prompt": prompt,
                "stream": False,
                **extra,
                "options": {"temperature": 0, "num_predict": 150, "ignore_eos": True},
            },
        )
        if results is not None:
            results[prompt] = r
        return r

    alone = {p: generate(p).json()["response"] for p in ("alpha", "beta")}  # type: ignore[union-attr]
    bad = generate("gamma", format=DEAD_END)  # alone first: also compiles the grammar machinery
    assert bad.status_code == 400 and "cannot be satisfied" in bad.json()["error"]  # type: ignore[union-attr]

    runner = current_runtime().pool.get_loaded(LLAMA).runner
    together: dict[str, object] = {}
    threads = [threading.Thread(target=generate, args=(p, together)) for p in alone]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while runner.batch_size() < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    bad = generate("gamma", format=DEAD_END)
    # The failed row's error is sent from inside the step; it leaves the batch right after that step.
    deadline = time.monotonic() + 5
    while runner.batch_size() > 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    still_running = runner.batch_size()
    for thread in threads:
        thread.join()
    assert bad.status_code == 400 and "cannot be satisfied" in bad.json()["error"]  # type: ignore[union-attr]
    assert still_running == 2, "the healthy rows should still have been decoding when the bad one failed"
    for prompt, text in alone.items():
        r = together[prompt]
        assert r.status_code == 200, r.text  # type: ignore[union-attr]
        assert r.json()["response"] == text and r.json()["eval_count"] == 150  # type: ignore[union-attr]


# -- copy and delete cannot lose a model ---------------------------------------------------------

GPT2 = "test-org/tiny-gpt2"
_GREEDY = {"temperature": 0, "num_predict": 4}


@pytest.fixture
def models(serve, install_model, tiny_llama_dir: Path, tiny_gpt2_dir: Path):
    snapshots = {LLAMA: install_model(tiny_llama_dir, LLAMA), GPT2: install_model(tiny_gpt2_dir, GPT2)}
    return serve(), snapshots


def _says(client, model: str) -> str:
    r = client.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False, "options": _GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["response"]


def _names(client) -> set[str]:
    return {m["model"] for m in client.get("/api/tags").json()["models"]}


@pytest.mark.parametrize("destination", [LLAMA, f"{LLAMA}:latest", f"{LLAMA}:main"])
def test_copy_onto_itself_is_refused_and_the_model_survives(models, destination: str) -> None:
    client, snapshots = models
    before = _says(client, LLAMA)
    r = client.post("/api/copy", json={"source": LLAMA, "destination": destination})
    assert r.status_code == 400 and "already is" in r.json()["error"]
    assert snapshots[LLAMA].is_dir() and not snapshots[LLAMA].is_symlink()
    assert _says(client, LLAMA) == before
    assert client.request("DELETE", "/api/delete", json={"model": LLAMA}).status_code == 200


def test_an_alias_copied_back_onto_its_source_is_refused(models) -> None:
    client, snapshots = models
    assert client.post("/api/copy", json={"source": LLAMA, "destination": "mine/llama"}).status_code == 200
    r = client.post("/api/copy", json={"source": "mine/llama", "destination": LLAMA})
    assert r.status_code == 400 and "already is" in r.json()["error"]
    assert snapshots[LLAMA].is_dir() and not snapshots[LLAMA].is_symlink()
    assert _says(client, LLAMA) == _says(client, "mine/llama")


def test_a_copy_to_another_tag_of_the_same_repo_is_a_second_ref(models) -> None:
    client, snapshots = models
    assert client.post("/api/copy", json={"source": LLAMA, "destination": f"{LLAMA}:v2"}).status_code == 200
    assert {f"{LLAMA}:latest", f"{LLAMA}:v2"} <= _names(client)
    assert client.request("DELETE", "/api/delete", json={"model": f"{LLAMA}:v2"}).status_code == 200
    assert snapshots[LLAMA].is_dir() and _says(client, LLAMA)


def test_a_copy_over_another_model_keeps_that_models_files(models) -> None:
    client, snapshots = models
    llama_says = _says(client, LLAMA)
    assert client.post("/api/copy", json={"source": LLAMA, "destination": GPT2}).status_code == 200
    assert _says(client, GPT2) == llama_says  # the name now means the copy
    assert (snapshots[GPT2] / "config.json").is_file()  # the files it named are still there
    assert snapshots[LLAMA].is_dir() and not snapshots[LLAMA].is_symlink()


def test_deleting_a_model_that_has_copies_names_them_and_keeps_everything(models) -> None:
    client, snapshots = models
    for alias in ("mine/a", "mine/b:v1"):
        assert client.post("/api/copy", json={"source": LLAMA, "destination": alias}).status_code == 200
    r = client.request("DELETE", "/api/delete", json={"model": LLAMA})
    assert r.status_code == 400 and "mine/a" in r.json()["error"] and "mine/b:v1" in r.json()["error"]
    assert {"mine/a:latest", "mine/b:v1", f"{LLAMA}:latest"} <= _names(client)
    assert _says(client, "mine/a") == _says(client, LLAMA)
    for name in ("mine/a", "mine/b:v1", LLAMA):
        assert client.request("DELETE", "/api/delete", json={"model": name}).status_code == 200
    assert not snapshots[LLAMA].exists()
    assert not {"mine/a:latest", "mine/b:v1", f"{LLAMA}:latest"} & _names(client)


# -- the pool's reaper and the output of slow readers --------------------------------------------


def _wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_the_keep_alive_reaper_survives_an_unload_that_raises(
    serve, install_model, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.server_process import current_runtime

    for name in (LLAMA, "test-org/second"):
        install_model(tiny_llama_dir, name)
    client = serve(KEEP_ALIVE="1s", BACKEND="transformers")
    loaded = lambda: {m["model"] for m in client.get("/api/ps").json()["models"]}  # noqa: E731
    assert client.post("/api/generate", json={"model": LLAMA}).status_code == 200
    runner = current_runtime().pool.get_loaded(LLAMA).runner
    real_unload = runner.unload

    def failing_unload() -> None:  # an unload that fails (a CUDA error, say: none can happen on this CPU)
        real_unload()
        raise RuntimeError("unload failed")

    monkeypatch.setattr(runner, "unload", failing_unload)
    assert _wait_until(lambda: not loaded())
    assert client.post("/api/generate", json={"model": "test-org/second"}).status_code == 200
    assert loaded() == {"test-org/second:latest"}
    assert _wait_until(lambda: not loaded()), "the reaper died with the failed unload"


def test_output_a_reader_has_not_taken_is_merged_not_queued(serve, install_model, tiny_llama_dir: Path) -> None:
    """The decode loop never waits for a slow reader: what it has not read merges into one chunk."""
    from runners.base import GenerationRequest, SamplingOptions
    from tests.support.server_process import current_runtime

    install_model(tiny_llama_dir, LLAMA)
    client = serve(BACKEND="transformers")
    options = {"temperature": 0, "num_predict": 120, "ignore_eos": True}
    whole = client.post(
        "/api/generate", json={"model": LLAMA, "prompt": "hi", "raw": True, "stream": False, "options": options}
    ).json()["response"]
    runner = current_runtime().pool.get_loaded(LLAMA).runner

    async def read_first_then_pause():
        import asyncio

        request = GenerationRequest(
            prompt="hi", options=SamplingOptions(max_tokens=120, temperature=0, ignore_eos=True, repeat_penalty=1.1)
        )
        from runners.prepare import prepare_prompt

        chunks = runner.generate(prepare_prompt(runner.tokenizer, request, runner.context_length))
        first = await anext(chunks)
        # the whole generation finishes while nobody reads; the batching thread has no event to await
        while runner.batch_size():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return first, [chunk async for chunk in chunks]

    first, rest = client.portal.call(read_first_then_pause)
    assert len(rest) == 1, f"{len(rest)} chunks were queued for the reader"
    assert rest[0].finish_reason == "length" and rest[0].completion_tokens == 120
    assert first.text + rest[0].text == whole


def test_a_top_p_below_float32s_smallest_number_keeps_the_best_token(client) -> None:
    """5e-324 is a valid top_p (> 0) that float32 rounds to 0: every token compared as "past
    top_p" and the sampler divided zero by zero."""
    for top_p in (5e-324, 1e-46):
        r = client.post(
            "/api/generate",
            json={
                "model": LLAMA,
                "prompt": "hi",
                "stream": False,
                "options": {"top_p": top_p, "temperature": 1, "num_predict": 3},
            },
        )
        assert r.status_code == 200, r.text
