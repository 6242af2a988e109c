"""LoRA adapters pulled from the Hub and served over their base model, on both engines.

The tests build a tiny base model and PEFT LoRA adapters with random, non-zero weights (so an
adapter changes the output), publish them on the local Hub and pull them through the server. An
adapter's greedy output must equal the same adapter applied by PEFT directly in the test, requests
for different adapters of one base run together on one loaded base, and an adapter whose base is
not pulled is refused before its weights download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.hub_server import LocalHub
from tests.support.server_process import ROOT, current_runtime, in_process_env
from tests.support.tiny_models import build_lora_adapter, build_tiny_llama

BASE = "test-org/lora-base"
ADAPTER_A = "test-org/lora-a"
ADAPTER_B = "test-org/lora-b"
ORPHAN = "test-org/lora-orphan"  # an adapter of a base nobody pulled
WIDE = "test-org/lora-wide"  # rank 16: above MAX_LORA_RANK=8 in the vLLM test, so PEFT serves it
MISSING_BASE = "test-org/never-pulled-base"
PROMPT = "the model answers the question about the weather"
TOKENS = 12


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base (head size 32, which vLLM's CPU attention supports) and its adapters, built once."""
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_llama(root / "base", hidden_size=128, seed=3, context=4096)
    return {
        BASE: base,
        ADAPTER_A: build_lora_adapter(base, root / "a", seed=1, base_name=BASE),
        ADAPTER_B: build_lora_adapter(base, root / "b", seed=2, base_name=BASE),
        ORPHAN: build_lora_adapter(base, root / "orphan", seed=4, base_name=MISSING_BASE),
        WIDE: build_lora_adapter(base, root / "wide", seed=5, base_name=BASE, rank=16),
    }


def peft_reference(repos: dict[str, Path], adapter: str | None, dtype: str = "float32") -> str:
    """The greedy completion of PROMPT by the base with `adapter` applied by PEFT itself."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repos[BASE])
    model = AutoModelForCausalLM.from_pretrained(repos[BASE], dtype=getattr(torch, dtype))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, repos[adapter])
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def complete(client: httpx.Client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def pull(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/api/pull", json={"model": model, "stream": False})


# -- transformers: PEFT -------------------------------------------------------------------------------
@pytest.fixture
def hub(repos: dict[str, Path], local_hub: LocalHub) -> LocalHub:
    for repo_id, folder in repos.items():
        local_hub.add_repo(repo_id, folder)
    return local_hub


def test_adapters_pulled_listed_and_served_with_peft_over_one_base(serve, hub: LocalHub, repos) -> None:
    client = serve(BACKEND="transformers")
    for model in (BASE, ADAPTER_A, ADAPTER_B):
        r = pull(client, model)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text

    tags = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert tags[f"{ADAPTER_A}:latest"]["details"]["parent_model"] == BASE
    assert tags[f"{BASE}:latest"]["details"]["parent_model"] == ""
    assert tags[f"{ADAPTER_A}:latest"]["details"]["family"] == tags[f"{BASE}:latest"]["details"]["family"]
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards[ADAPTER_B]["parent"] == BASE
    show = client.post("/api/show", json={"model": ADAPTER_A}).json()
    assert show["details"]["parent_model"] == BASE
    assert f"FROM {BASE}\nADAPTER {ADAPTER_A}:latest" in show["modelfile"]

    base_text = complete(client, BASE)
    a_text, b_text = complete(client, ADAPTER_A), complete(client, ADAPTER_B)
    assert a_text != base_text and b_text != base_text and a_text != b_text
    assert base_text == peft_reference(repos, None)
    assert a_text == peft_reference(repos, ADAPTER_A)
    assert b_text == peft_reference(repos, ADAPTER_B)

    # Every dialect takes the adapter's name: Ollama's too.
    r = client.post(
        "/api/generate",
        json={
            "model": ADAPTER_A,
            "prompt": PROMPT,
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": TOKENS, "repeat_penalty": 1.0},
        },
    )
    assert r.status_code == 200 and r.json()["response"] == a_text, r.text

    # Concurrent requests for both adapters and the base: each exactly its own output.
    names = [ADAPTER_A, ADAPTER_B, BASE] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        texts = list(pool.map(lambda name: complete(client, name), names))
    assert texts == [a_text, b_text, base_text] * 2

    # One base in memory, the adapters attached to it.
    status = client.get("/status").json()
    assert [(e["model"], e["adapters"]) for e in status["loaded_models"]] == [(BASE, [ADAPTER_A, ADAPTER_B])]
    ps = {m["name"]: m for m in client.get("/api/ps").json()["models"]}
    assert set(ps) == {f"{BASE}:latest", f"{ADAPTER_A}:latest", f"{ADAPTER_B}:latest"}
    assert ps[f"{ADAPTER_B}:latest"]["details"]["parent_model"] == BASE
    assert ps[f"{BASE}:latest"]["details"]["parent_model"] == ""

    # Embeddings of the base are the base's, adapters attached or not.
    r = client.post("/api/embed", json={"model": BASE, "input": "hello"})
    assert r.status_code == 200, r.text
    r = client.post("/api/embed", json={"model": ADAPTER_A, "input": "hello"})
    assert r.status_code == 400 and BASE in r.json()["error"]


def test_requests_for_two_adapters_decode_in_one_batch(serve, hub: LocalHub, repos) -> None:
    """While a request for each adapter streams, the base's one runner decodes both together."""
    import time

    client = serve(BACKEND="transformers")
    for model in (BASE, ADAPTER_A, ADAPTER_B):
        assert pull(client, model).status_code == 200
    runtime = current_runtime()
    body = {"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
    seen: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(complete_streaming, client, {**body, "model": m}) for m in (ADAPTER_A, ADAPTER_B)]
        deadline = time.monotonic() + 120
        while not all(s.done() for s in streams) and time.monotonic() < deadline:
            seen.extend(entry.runner.batch_size() for entry in runtime.pool.loaded())
            time.sleep(0.01)
        assert [len(s.result()) > 0 for s in streams] == [True, True]
    assert max(seen) == 2, "the two adapters' requests never decoded in one batch"


def complete_streaming(client: httpx.Client, body: dict) -> str:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.text


def test_an_adapter_whose_base_is_not_pulled_fails_before_downloading(serve, hub: LocalHub, repos) -> None:
    client = serve(BACKEND="transformers")
    r = pull(client, ORPHAN)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert f"'{ORPHAN}' is a LoRA adapter of '{MISSING_BASE}', which is not pulled" in error
    assert f"pull '{MISSING_BASE}' first" in error
    weights = [q for q in hub.requests if q.path.endswith("adapter_model.safetensors")]
    assert weights == []  # refused on its config alone
    assert ORPHAN not in [m["id"] for m in client.get("/v1/models").json()["data"]]

    # An adapter whose base was deleted after both were pulled: its requests name the base to pull.
    assert pull(client, BASE).status_code == 200 and pull(client, ADAPTER_A).status_code == 200
    assert client.request("DELETE", "/api/delete", json={"model": BASE}).status_code == 200
    r = client.post("/v1/completions", json={"model": ADAPTER_A, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404
    assert f"pull '{BASE}' first" in r.json()["error"]["message"]


def test_the_cli_pulls_an_adapter_after_its_base_and_says_which_base_is_missing(hub: LocalHub, tmp_path: Path) -> None:
    """`ai-server pull` against a real socket: the adapter's job error is the CLI's error."""
    from tests.support.server_process import in_process_server

    env = {"HF_HOME": str(tmp_path / "hf"), "DATA_DIR": str(tmp_path / "data"), "BACKEND": "transformers"}
    with in_process_server({**env, "HF_ENDPOINT": hub.endpoint}) as url:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            run_env = {**os.environ, "AI_SERVER_HOST": url, "COLUMNS": "200"}
            run_env.pop("AI_SERVER_API_KEY", None)
            return subprocess.run(
                [sys.executable, "-m", "cli", *args], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=180
            )

        missing = cli("pull", ADAPTER_A)
        assert missing.returncode == 1
        assert f"'{ADAPTER_A}' is a LoRA adapter of '{BASE}', which is not pulled" in missing.stderr, missing.stderr
        for model in (BASE, ADAPTER_A):
            assert cli("pull", model).returncode == 0
        listing = cli("list")
        assert listing.returncode == 0 and ADAPTER_A in listing.stdout, listing.stdout


# -- vLLM: LoRARequest per request --------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_url(repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One in-process server with BACKEND=auto on a real socket, the base and adapters in its cache."""
    from tests.support.server_process import in_process_server

    root = tmp_path_factory.mktemp("lora-vllm")
    models = {repo_id: repos[repo_id] for repo_id in (BASE, ADAPTER_A, ADAPTER_B, WIDE)}
    env = in_process_env(root, models, "auto", MAX_LORA_RANK="8", MAX_LORAS="2")
    with in_process_server(env) as url:
        yield url
    shutil.rmtree(root, ignore_errors=True)


def test_adapters_on_vllm_share_the_base_engine_and_match_peft(vllm_url: str, repos) -> None:
    with httpx.Client(base_url=vllm_url, timeout=900) as client:  # an engine start under load
        names = [ADAPTER_A, ADAPTER_B, BASE]
        with ThreadPoolExecutor(len(names)) as pool:
            texts = dict(zip(names, pool.map(lambda name: complete(client, name), names), strict=True))
        status = client.get("/status").json()
        [base] = status["loaded_models"]
        assert (base["model"], base["backend"], base["adapters"]) == (BASE, "vllm", [ADAPTER_A, ADAPTER_B])
        dtype = {"FP32": "float32", "BF16": "bfloat16"}[base["quantization"].upper()]
        for name in names:
            assert texts[name] == peft_reference(repos, None if name == BASE else name, dtype), name
        assert texts[ADAPTER_A] != texts[BASE]

        # Rank 16 > MAX_LORA_RANK: vLLM refuses it, PEFT serves it on the transformers runner beside.
        wide = complete(client, WIDE)
        assert wide == peft_reference(repos, WIDE, dtype)
        loaded = {(e["model"], e["backend"]): e["adapters"] for e in client.get("/status").json()["loaded_models"]}
        assert loaded == {(BASE, "vllm"): [ADAPTER_A, ADAPTER_B], (BASE, "transformers"): [WIDE]}
        ps = [m["name"] for m in client.get("/api/ps").json()["models"]]
        assert sorted(ps).count(f"{WIDE}:latest") == 1


def test_lora_limits_are_settings_vllm_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    from settings import SettingsError, load_settings

    monkeypatch.setenv("MAX_LORA_RANK", "32")
    monkeypatch.setenv("MAX_LORAS", "3")
    settings = load_settings()
    assert (settings.max_lora_rank, settings.max_loras) == (32, 3)
    assert settings.public()["max_lora_rank"] == 32
    monkeypatch.setenv("MAX_LORA_RANK", "33")
    with pytest.raises(SettingsError, match="MAX_LORA_RANK: Value error, must be one of vLLM's LoRA ranks"):
        load_settings()
