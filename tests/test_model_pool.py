"""The model pool through the running server: LRU, memory budget, keep-alive, cooldown,
single loads, quantization and trust_remote_code."""

from __future__ import annotations

import gc
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import runners.loader
from tests.support.bodies import chat_body
from tests.support.server_process import current_runtime

A, B, C = "test-org/model-a", "test-org/model-b", "test-org/model-c"


def chat(client, model: str, **extra: object):
    return client.post("/chat", json=chat_body(model, max_tokens=2, **extra))


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def three_models(install_model, tiny_llama_dir: Path) -> None:
    for name in (A, B, C):
        install_model(tiny_llama_dir, name)


def test_third_model_evicts_least_recently_used_and_frees_it(serve, three_models) -> None:
    client = serve(MAX_CACHE_MODELS="2")
    for name in (A, B, A):  # B is now the least recently used
        assert chat(client, name).status_code == 200
    b_weights = weakref.ref(current_runtime().pool.get_loaded(B).runner.hf_model)
    assert chat(client, C).status_code == 200

    status = client.get("/status").json()
    assert status["cache_size"] == 2 and sorted(status["cached_models"]) == [A, C]
    loaded = {m["model"]: m["loaded"] for m in client.get("/models").json()["models"]}
    assert loaded == {A: True, B: False, C: True}
    gc.collect()
    assert b_weights() is None, "the evicted model's weights are still referenced"


def test_memory_budget_evicts_to_fit(serve, three_models) -> None:
    client = serve(MAX_CACHE_MODELS="5")
    chat(client, A)
    one_model = client.get("/status").json()["memory_in_use_bytes"]
    client = serve(MAX_CACHE_MODELS="5", MODEL_MEMORY_BUDGET_BYTES=str(int(one_model * 1.5)))
    chat(client, A)
    chat(client, B)
    status = client.get("/status").json()
    assert status["cached_models"] == [B]
    assert status["memory_in_use_bytes"] <= one_model * 1.5


def test_idle_model_unloads_when_keep_alive_passes(serve, three_models) -> None:
    client = serve(KEEP_ALIVE="1s")
    chat(client, A)
    [entry] = client.get("/status").json()["loaded_models"]
    assert entry["expires_at"] == pytest.approx(time.time() + 1, abs=1.0)
    assert wait_until(lambda: client.get("/status").json()["cache_size"] == 0, timeout=5)


def test_concurrent_requests_share_one_load(serve, three_models, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real_load = runners.loader.load_runner

    def counting_load(choice, model, *args):  # a spy: the real load still runs
        loads.append(model.ref.name)
        return real_load(choice, model, *args)

    monkeypatch.setattr(runners.loader, "load_runner", counting_load)
    client = serve()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: chat(client, A), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert loads == [A]


def test_failed_load_reports_cause_then_cools_down(serve, install_model, broken_model_dir: Path, three_models) -> None:
    install_model(broken_model_dir, "test-org/broken")
    client = serve(MODEL_LOAD_COOLDOWN="2")
    first = chat(client, "test-org/broken")
    assert first.status_code == 500
    assert "failed to load" in first.json()["error"]

    second = chat(client, "test-org/broken")
    assert second.status_code == 503
    message = second.json()["error"]
    assert "not be retried" in message and "MODEL_LOAD_COOLDOWN" in message
    assert 1 <= int(second.headers["Retry-After"]) <= 2
    failed = client.get("/status").json()["failed_loads"]
    assert set(failed) == {"test-org/broken"} and 0 < failed["test-org/broken"]["retry_in_seconds"] <= 2

    # Other models and the server stay healthy.
    assert chat(client, A).status_code == 200
    assert client.get("/health").json()["status"] == "healthy"

    time.sleep(2.1)  # cooldown over: the load is really retried (and fails again, with its cause)
    assert chat(client, "test-org/broken").status_code == 500


def test_q4_on_cpu_uses_bitsandbytes_4bit_layers(serve, three_models) -> None:
    import bitsandbytes as bnb

    client_fp32 = serve(MODEL_Q4_THRESHOLD_BYTES="14e9")
    chat(client_fp32, A)
    fp32 = {m["model"]: m for m in client_fp32.get("/models").json()["models"]}[A]

    client = serve(MODEL_Q4_THRESHOLD_BYTES="0")  # every model is "large": auto picks 4-bit
    r = chat(client, A)
    assert r.status_code == 200 and r.json()["eval_count"] >= 1
    q4 = {m["model"]: m for m in client.get("/models").json()["models"]}[A]
    assert q4["quantization"] == "nf4" and "MODEL_Q4_THRESHOLD_BYTES" in q4["quantization_reason"]
    assert fp32["quantization"] == "fp32"
    assert q4["memory_bytes"] < fp32["memory_bytes"]
    model = current_runtime().pool.get_loaded(A).runner.hf_model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)


def test_remote_code_needs_the_operator_allow_list(serve, install_model, remote_code_model_dir: Path) -> None:
    install_model(remote_code_model_dir, "test-org/custom-code")
    denied = chat(serve(), "test-org/custom-code")
    assert denied.status_code == 403
    assert "TRUST_REMOTE_CODE_MODELS" in denied.json()["error"]
    allowed = chat(serve(TRUST_REMOTE_CODE_MODELS="other/model, test-org/custom-code"), "test-org/custom-code")
    assert allowed.status_code == 200


@pytest.mark.parametrize("damage", ["incomplete-blob", "missing-shard-link", "pull-marker"])
def test_incomplete_snapshot_is_not_served(serve, install_model, tiny_llama_dir: Path, damage: str) -> None:
    snapshot = install_model(tiny_llama_dir, A)
    repo = snapshot.parent.parent
    if damage == "incomplete-blob":
        (repo / "blobs" / "0123abcd.incomplete").write_bytes(b"partial")
    elif damage == "missing-shard-link":
        (snapshot / "model.safetensors").unlink()
    else:
        (repo / ".ai-server-pull-in-progress").write_text("1")
    client = serve()
    assert client.get("/models").json()["models"] == []
    assert chat(client, A).status_code == 404
