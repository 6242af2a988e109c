"""Presets (Ollama's `POST /api/create`) and PRELOAD_MODELS, against the real service app in-process.

A preset's settings must reach the prompt and the sampler in every dialect: each test compares a
request to the preset with the same request made explicitly (the system message and options
written out) and asserts equal prompt token counts and equal greedy output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ollama
import pytest
from starlette.testclient import TestClient

from tests.support.server_process import running_server

LLAMA = "test-org/tiny-llama"
GPT2 = "test-org/tiny-gpt2"
SYSTEM = "You are a pirate who answers in riddles."
PARAMETERS = {"temperature": 0, "num_predict": 7, "top_k": 20}
USER = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
def client(serve, install_model, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> TestClient:
    install_model(tiny_llama_dir, LLAMA)
    install_model(tiny_gpt2_dir, GPT2)
    return serve(BACKEND="transformers")


def create(client: TestClient, name: str, **fields: object) -> dict:
    r = client.post("/api/create", json={"model": name, "from": LLAMA, "stream": False, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def ollama_chat(client: TestClient, model: str, messages: list[dict], **options: object) -> dict:
    r = client.post("/api/chat", json={"model": model, "messages": messages, "stream": False, "options": options})
    assert r.status_code == 200, r.text
    return r.json()


def test_system_prompt_and_parameters_reach_the_prompt_and_the_sampler(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS)
    preset = ollama_chat(client, "pirate", USER)
    explicit = ollama_chat(client, LLAMA, [{"role": "system", "content": SYSTEM}, *USER], **PARAMETERS)
    plain = ollama_chat(client, LLAMA, USER, **PARAMETERS)
    assert preset["model"] == "pirate"
    assert preset["prompt_eval_count"] == explicit["prompt_eval_count"] > plain["prompt_eval_count"]
    assert preset["eval_count"] == 7 and preset["done_reason"] == "length"  # num_predict
    assert preset["message"]["content"] == explicit["message"]["content"]  # temperature 0: greedy


def test_request_values_override_the_preset(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS)
    shorter = ollama_chat(client, "pirate", USER, num_predict=3)
    assert shorter["eval_count"] == 3
    own_system = [{"role": "system", "content": "Be brief."}, *USER]
    preset = ollama_chat(client, "pirate", own_system)
    explicit = ollama_chat(client, LLAMA, own_system, **PARAMETERS)  # the request's system replaces the preset's
    assert preset["prompt_eval_count"] == explicit["prompt_eval_count"]
    assert preset["message"]["content"] == explicit["message"]["content"]


def test_messages_start_every_conversation(client: TestClient) -> None:
    start = [{"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": "Arr, matey"}]
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS, messages=start)
    preset = ollama_chat(client, "pirate", USER)
    explicit = ollama_chat(client, LLAMA, [{"role": "system", "content": SYSTEM}, *start, *USER], **PARAMETERS)
    assert preset["prompt_eval_count"] == explicit["prompt_eval_count"]
    assert preset["message"]["content"] == explicit["message"]["content"]


def test_every_dialect_serves_the_preset(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS)
    system = {"role": "system", "content": SYSTEM}

    def openai_chat(model: str, messages: list[dict], **extra: object) -> dict:
        r = client.post("/v1/chat/completions", json={"model": model, "messages": messages, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    preset, explicit = openai_chat("pirate", USER), openai_chat(LLAMA, [system, *USER], temperature=0, max_tokens=7)
    assert preset["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"]
    assert preset["usage"]["completion_tokens"] == 7
    assert preset["choices"][0]["message"]["content"] == explicit["choices"][0]["message"]["content"]
    assert preset["model"] == "pirate"

    # Raw completions take only the parameters (as Ollama's raw prompts do): no system prompt.
    completion = client.post("/v1/completions", json={"model": "pirate", "prompt": "Once upon"}).json()
    explicit_completion = client.post(
        "/v1/completions", json={"model": LLAMA, "prompt": "Once upon", "temperature": 0, "max_tokens": 7}
    ).json()
    assert completion["usage"] == explicit_completion["usage"]
    assert completion["choices"][0]["text"] == explicit_completion["choices"][0]["text"]

    def anthropic(model: str, **extra: object) -> dict:
        body = {"model": model, "max_tokens": 7, "messages": USER, **extra}
        r = client.post("/v1/messages", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    preset, explicit = anthropic("pirate"), anthropic(LLAMA, system=SYSTEM, temperature=0, top_k=20)
    assert preset["usage"] == explicit["usage"]
    assert preset["content"] == explicit["content"]
    assert anthropic("pirate", max_tokens=3)["usage"]["output_tokens"] == 3  # the request's max_tokens wins

    def responses(model: str, **extra: object) -> dict:
        r = client.post("/v1/responses", json={"model": model, "input": "Why is the sky blue?", **extra})
        assert r.status_code == 200, r.text
        return r.json()

    preset, explicit = responses("pirate"), responses(LLAMA, instructions=SYSTEM, temperature=0, max_output_tokens=7)
    assert preset["usage"]["input_tokens"] == explicit["usage"]["input_tokens"]
    assert preset["usage"]["output_tokens"] == 7
    assert preset["output"][0]["content"][0]["text"] == explicit["output"][0]["content"][0]["text"]

    native = client.post("/chat", json={"model": "pirate", "messages": USER}).json()
    explicit_native = client.post(
        "/chat", json={"model": LLAMA, "messages": [system, *USER], "temperature": 0, "max_tokens": 7}
    ).json()
    assert native["prompt_eval_count"] == explicit_native["prompt_eval_count"]
    assert native["message"] == explicit_native["message"] and native["eval_count"] == 7

    generate = client.post("/api/generate", json={"model": "pirate", "prompt": "Hi", "stream": False}).json()
    explicit_generate = client.post(
        "/api/generate",
        json={"model": LLAMA, "prompt": "Hi", "system": SYSTEM, "options": PARAMETERS, "stream": False},
    ).json()
    assert generate["prompt_eval_count"] == explicit_generate["prompt_eval_count"]
    assert generate["response"] == explicit_generate["response"]


def test_a_preset_over_a_model_without_a_chat_template(client: TestClient) -> None:
    """/api/generate on a base model: the system prompt goes before the prompt, as Ollama writes it."""
    create(client, "storyteller", **{"from": GPT2}, system="Tell a story.", parameters={"temperature": 0})
    preset = client.post(
        "/api/generate", json={"model": "storyteller", "prompt": "Once", "stream": False, "options": {"num_predict": 5}}
    ).json()
    raw = client.post(
        "/api/generate",
        json={
            "model": GPT2,
            "prompt": "Tell a story.\n\nOnce",
            "raw": True,
            "stream": False,
            "options": {"num_predict": 5, "temperature": 0},
        },
    ).json()
    assert preset["prompt_eval_count"] == raw["prompt_eval_count"]
    assert preset["response"] == raw["response"]


def test_a_jinja_template_replaces_the_models_and_a_go_template_is_refused(client: TestClient) -> None:
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    create(client, "plain", template=template, parameters={"temperature": 0, "num_predict": 5})
    chat = ollama_chat(client, "plain", USER)
    raw = client.post(
        "/api/generate",
        json={
            "model": LLAMA,
            "prompt": "user: Why is the sky blue?\nassistant:",
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 5},
        },
    ).json()
    assert chat["prompt_eval_count"] == raw["prompt_eval_count"]
    assert chat["message"]["content"] == raw["response"]
    assert client.post("/api/show", json={"model": "plain"}).json()["template"] == template

    go = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}"
    r = client.post("/api/create", json={"model": "go", "from": LLAMA, "template": go})
    assert r.status_code == 400 and "Go" in r.json()["error"] and "Jinja" in r.json()["error"]
    r = client.post("/api/create", json={"model": "bad", "from": LLAMA, "template": "{% for %}"})
    assert r.status_code == 400 and "Jinja" in r.json()["error"]


def test_create_streams_ollamas_status_lines(client: TestClient) -> None:
    r = client.post(
        "/api/create", json={"model": "pirate", "from": LLAMA, "system": SYSTEM, "parameters": {"stop": "\n"}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0] == {"status": "reading model metadata"}
    assert {"status": "creating system layer"} in lines and {"status": "creating parameters layer"} in lines
    assert lines[-2:] == [{"status": "writing manifest"}, {"status": "success"}]


def test_list_show_copy_and_delete(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM, parameters={**PARAMETERS, "stop": ["<|user|>", "Arr"]})
    tags = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert tags["pirate:latest"]["details"]["parent_model"] == f"{LLAMA}:latest"
    assert tags["pirate:latest"]["size"] == tags[f"{LLAMA}:latest"]["size"] > 0
    assert tags["pirate:latest"]["digest"] != tags[f"{LLAMA}:latest"]["digest"]
    assert "pirate" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.get("/v1/models/pirate").json()["id"] == "pirate"

    shown = client.post("/api/show", json={"model": "pirate"}).json()
    assert shown["system"] == SYSTEM
    assert shown["parameters"].splitlines() == [
        f"{'temperature':<30} 0",
        f"{'num_predict':<30} 7",
        f"{'top_k':<30} 20",
        f'{"stop":<30} "<|user|>"',
        f'{"stop":<30} "Arr"',
    ]
    assert shown["modelfile"].startswith('# Modelfile generated by "ollama show"\n')
    assert f"\nFROM {LLAMA}:latest\nSYSTEM {SYSTEM}\nPARAMETER temperature 0\n" in shown["modelfile"]
    assert "PARAMETER stop <|user|>\nPARAMETER stop Arr\n" in shown["modelfile"]
    assert "<|assistant|>" in shown["template"]  # the base model's own
    assert shown["details"]["family"] == "llama" and shown["details"]["parent_model"] == f"{LLAMA}:latest"
    assert "completion" in shown["capabilities"]

    assert client.post("/api/copy", json={"source": "pirate", "destination": "corsair"}).status_code == 200
    copied = ollama_chat(client, "corsair", USER)
    assert copied == {**ollama_chat(client, "pirate", USER), "model": "corsair", **_timings(copied)}
    assert client.post("/api/show", json={"model": "corsair"}).json()["system"] == SYSTEM

    assert client.request("DELETE", "/api/delete", json={"model": "pirate"}).status_code == 200
    names = [m["name"] for m in client.get("/api/tags").json()["models"]]
    assert "pirate:latest" not in names and "corsair:latest" in names and f"{LLAMA}:latest" in names
    assert ollama_chat(client, LLAMA, USER, num_predict=2)["done"]  # the base's files are untouched
    r = client.post("/api/chat", json={"model": "pirate", "messages": USER, "stream": False})
    assert r.status_code == 404
    assert client.request("DELETE", "/api/delete", json={"model": "pirate"}).status_code == 404


def _timings(response: dict) -> dict:
    keys = ("created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    return {k: response[k] for k in keys}


def test_a_preset_of_a_preset_inherits_and_overrides(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS)
    create(client, "captain", **{"from": "pirate:latest"}, parameters={"num_predict": 4})
    shown = client.post("/api/show", json={"model": "captain"}).json()
    assert shown["system"] == SYSTEM and f"\nFROM {LLAMA}:latest\n" in shown["modelfile"]
    captain = ollama_chat(client, "captain", USER)
    explicit = ollama_chat(
        client, LLAMA, [{"role": "system", "content": SYSTEM}, *USER], **{**PARAMETERS, "num_predict": 4}
    )
    assert captain["eval_count"] == 4
    assert captain["message"]["content"] == explicit["message"]["content"]


def test_a_quantized_preset_loads_on_its_own_beside_its_base(client: TestClient) -> None:
    create(client, "pirate-q4", system=SYSTEM, parameters=PARAMETERS, quantize="q4_K_M")
    ollama_chat(client, LLAMA, USER, num_predict=2)
    answer = ollama_chat(client, "pirate-q4", USER)
    assert answer["eval_count"] == 7
    loaded = {m["name"]: m["details"]["quantization_level"] for m in client.get("/api/ps").json()["models"]}
    assert loaded == {f"{LLAMA}:latest": "FP32", "pirate-q4:latest": "NF4"}
    assert client.request("DELETE", "/api/delete", json={"model": "pirate-q4"}).status_code == 200
    assert [m["name"] for m in client.get("/api/ps").json()["models"]] == [f"{LLAMA}:latest"]  # unloaded


def test_an_adapter_preset_runs_on_the_adapter_model(
    client: TestClient, install_model, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Adapters are served as models of their own (over their base); a preset with one runs on it:
    the same greedy answer as the adapter asked explicitly with the preset's system prompt."""
    from tests.support.tiny_models import build_lora_adapter

    adapter = build_lora_adapter(tiny_llama_dir, tmp_path / "lora", seed=3, base_name=LLAMA)
    install_model(adapter, "test-org/tiny-lora")
    create(client, "tuned", system=SYSTEM, parameters=PARAMETERS, adapters={"test-org/tiny-lora": "sha256:unused"})
    shown = client.post("/api/show", json={"model": "tuned"}).json()
    assert f"\nFROM {LLAMA}:latest\nADAPTER test-org/tiny-lora\n" in shown["modelfile"]
    r = client.post("/api/chat", json={"model": "tuned", "messages": USER, "stream": False})
    assert r.status_code == 200, r.text
    explicit = client.post(
        "/api/chat",
        json={
            "model": "test-org/tiny-lora",
            "messages": [{"role": "system", "content": SYSTEM}, *USER],
            "options": PARAMETERS,
            "stream": False,
        },
    ).json()
    base = client.post(
        "/api/chat",
        json={
            "model": LLAMA,
            "messages": [{"role": "system", "content": SYSTEM}, *USER],
            "options": PARAMETERS,
            "stream": False,
        },
    ).json()
    assert r.json()["message"]["content"] == explicit["message"]["content"] != base["message"]["content"]
    assert r.json()["prompt_eval_count"] == explicit["prompt_eval_count"]


def test_a_preset_embeds_with_its_model(client: TestClient) -> None:
    create(client, "pirate", system=SYSTEM)
    preset = client.post("/api/embed", json={"model": "pirate", "input": "ahoy"}).json()
    base = client.post("/api/embed", json={"model": LLAMA, "input": "ahoy"}).json()
    assert preset["embeddings"] == base["embeddings"] and preset["model"] == "pirate"
    loaded = client.post("/api/generate", json={"model": "pirate", "stream": False}).json()  # no prompt: load
    assert loaded["done_reason"] == "load"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "x", "from": "test-org/never-pulled"}, 404, "not found, try pulling it first"),
        ({"model": "x"}, 400, "neither 'from' or 'files' was specified"),
        ({"model": "../etc", "from": LLAMA}, 400, "invalid model name"),
        ({"model": "x", "from": LLAMA, "parameters": {"temperature": -1}}, 400, "temperature"),
        ({"model": "x", "from": LLAMA, "parameters": {"top_p": "high"}}, 400, "top_p"),
        ({"model": LLAMA, "from": GPT2}, 400, "is a pulled model"),
        ({"model": "x", "from": LLAMA, "adapters": {"a/one": "", "a/two": ""}}, 400, "only one adapter"),
        (
            {"model": "x", "from": LLAMA, "adapters": {"a/never-pulled": ""}},
            404,
            "adapter 'a/never-pulled' is not pulled",
        ),
        ({"model": "x", "from": LLAMA, "adapters": {GPT2: ""}}, 400, "is not a LoRA adapter"),
        ({"model": "x", "from": LLAMA, "quantize": "q8_0"}, 400, "unsupported quantization type q8_0"),
        ({"model": "x", "from": LLAMA, "files": {"model.gguf": "sha256:00"}}, 400, "not supported here"),
        ({"model": "x", "modelfile": f"FROM {LLAMA}"}, 400, "`modelfile`"),
    ],
)
def test_create_errors_in_ollamas_format(client: TestClient, body: dict, status: int, words: str) -> None:
    r = client.post("/api/create", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert "x:latest" not in [m["name"] for m in client.get("/api/tags").json()["models"]]


def test_the_official_ollama_client_creates_and_uses_a_preset(
    install_model, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Over real `bentoml serve` replicas (the client needs a real socket) that share one database:
    a preset created through one is served by the other."""
    install_model(tiny_llama_dir, LLAMA)
    env = {
        "BACKEND": "transformers",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'shared' / 'jobs.db'}",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    with (
        running_server({**env, "DATA_DIR": str(tmp_path / "a")}, tmp_path / "a.log") as url,
        running_server({**env, "DATA_DIR": str(tmp_path / "b")}, tmp_path / "b.log") as other_url,
    ):
        sdk, other = ollama.Client(host=url), ollama.Client(host=other_url)
        assert sdk.create(model="pirate", from_=LLAMA, system=SYSTEM, parameters=PARAMETERS).status == "success"
        statuses = [p.status for p in sdk.create(model="sailor", from_="pirate", system="Sail.", stream=True)]
        assert statuses[0] == "reading model metadata" and statuses[-1] == "success"
        assert {"pirate:latest", "sailor:latest"} <= {m.model for m in sdk.list().models}
        shown = sdk.show("sailor")  # the client's ShowResponse has no `system`: the Modelfile carries it
        assert "\nSYSTEM Sail.\n" in shown.modelfile and shown.details.parent_model == f"{LLAMA}:latest"
        answer = sdk.chat("pirate", messages=USER)
        explicit = sdk.chat(LLAMA, messages=[{"role": "system", "content": SYSTEM}, *USER], options=PARAMETERS)
        assert answer.eval_count == 7 and answer.prompt_eval_count == explicit.prompt_eval_count
        assert answer.message.content == explicit.message.content
        assert other.chat("pirate", messages=USER).message.content == answer.message.content  # the other replica
        with pytest.raises(ollama.ResponseError) as err:
            sdk.create(model="ghost", from_="test-org/never-pulled")
        assert err.value.status_code == 404
        sdk.delete("sailor")
        assert "sailor:latest" not in {m.model for m in other.list().models}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The default database (SQLite in DATA_DIR), or a real PostgreSQL one (DATABASE_URL)."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()


def test_a_preset_survives_a_restart_and_is_preloaded(
    serve, install_model, tiny_llama_dir: Path, database_url: str
) -> None:
    install_model(tiny_llama_dir, LLAMA)
    client = serve(BACKEND="transformers", DATABASE_URL=database_url)
    create(client, "pirate", system=SYSTEM, parameters=PARAMETERS, messages=[{"role": "user", "content": "Ahoy"}])
    before = ollama_chat(client, "pirate", USER)
    restarted = serve(BACKEND="transformers", DATABASE_URL=database_url, PRELOAD_MODELS="pirate")  # same database
    _wait_ready(restarted)
    assert [m["name"] for m in restarted.get("/api/ps").json()["models"]] == [f"{LLAMA}:latest"]  # its base
    assert restarted.get("/status").json()["preload"]["loaded"] == ["pirate"]
    after = ollama_chat(restarted, "pirate", USER)
    assert after["message"] == before["message"] and after["prompt_eval_count"] == before["prompt_eval_count"]
    assert after["load_duration"] == 0  # preloaded: the first request found it loaded


def test_preload_models_load_before_the_first_request_and_failures_are_reported(
    serve, install_model, tiny_llama_dir: Path
) -> None:
    install_model(tiny_llama_dir, LLAMA)
    client = serve(BACKEND="transformers", PRELOAD_MODELS=f"test-org/never-pulled,{LLAMA}", MAX_CACHE_MODELS="2")
    _wait_ready(client)
    assert [m["name"] for m in client.get("/api/ps").json()["models"]] == [f"{LLAMA}:latest"]
    preload = client.get("/status").json()["preload"]
    assert preload["models"] == ["test-org/never-pulled", LLAMA] and preload["finished"]
    assert preload["loaded"] == [LLAMA]
    assert "not pulled" in preload["failed"]["test-org/never-pulled"]
    assert ollama_chat(client, LLAMA, USER, num_predict=2)["load_duration"] == 0


def test_a_malformed_preload_name_stops_the_server_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from settings import SettingsError, load_settings

    monkeypatch.setenv("PRELOAD_MODELS", "good/name,../bad")
    with pytest.raises(SettingsError, match="PRELOAD_MODELS"):
        load_settings()


def _wait_ready(client: TestClient, timeout: float = 120) -> None:
    """BentoML's readiness probe (`__is_ready__`): true once PRELOAD_MODELS are loaded or failed."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)
