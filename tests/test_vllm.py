"""The vLLM runner for real: the CPU build of vLLM's V1 engine behind the real server, over HTTP.

An engine start costs ~15 s here, so each class shares one server: an in-process server on a real
socket with BACKEND=vllm (real disconnects, and the engine is inspectable), then `bentoml serve`
with BACKEND=auto. Two tiny llamas: SMALL, which vLLM serves, and LARGE, whose weights exceed
MODEL_Q4_THRESHOLD_BYTES so it loads as bitsandbytes 4-bit, which vLLM cannot run on CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import jsonschema
import psutil
import pytest

from runners.backend import choose_backend
from runners.quantization import Precision, bf16_cpu_feature
from tests.support.bodies import chat_body
from tests.support.server_process import UNREACHABLE_HUB, in_process_server, running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

SMALL = "test-org/tiny-llama-vllm"
LARGE = "test-org/tiny-llama-large"
CONTEXT = 16384  # room for a generation of ~25 s (~600 tokens/s here), so an abort stands out
FP32 = Precision("fp32", "full precision on CPU (float32)")


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both models in a private HF cache, and every folder vLLM writes to inside the test's own."""
    root = tmp_path_factory.mktemp("vllm")
    # head size 32: vLLM's CPU attention has no kernel for the default tiny llama's 16.
    # bf16, as most Hub checkpoints: on a CPU with native bf16 vLLM runs it in bf16.
    small = build_tiny_llama(root / "small", hidden_size=128, dtype="bfloat16")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    large = build_tiny_llama(root / "large", hidden_size=128, layers=4)
    install_into_hf_cache(small, root / "hf" / "hub", SMALL)
    install_into_hf_cache(large, root / "hf" / "hub", LARGE)
    (root / "rpc").mkdir()
    return {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "MODEL_Q4_THRESHOLD_BYTES": str((small / "model.safetensors").stat().st_size),
        "VLLM_CACHE_ROOT": str(root / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "VLLM_RPC_BASE_PATH": str(root / "rpc"),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "ENFORCE_EAGER": "true",  # an engine start without compiling: seconds, not a minute
    }


def engine_processes() -> list[psutil.Process]:
    """vLLM's engine core and workers among this test's descendants (vLLM names them VLLM::...)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name().startswith("VLLM") and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def model_entry(url: str, name: str) -> dict:
    return next(m for m in httpx.get(f"{url}/models").json()["models"] if m["model"] == name)


def reference_embeddings(path: str, texts: list[str]) -> list[list[float]]:
    """What /api/embed means, computed here with transformers alone: the mean of the last hidden
    states over each text's tokens, L2-normalized."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32)
    vectors = []
    with torch.inference_mode():
        for text in texts:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1).tolist())
    return vectors


def running_engine() -> AsyncLLM:
    from service import app

    [entry] = [e for e in app.state.runtime.pool.loaded() if e.name == SMALL]
    return entry.runner.engine


def test_choice_states_what_vllm_cannot_run() -> None:
    """The decision asks vLLM itself: its model registry and its CPU attention kernels."""
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 4}
    chosen = choose_backend("auto", device="cpu", config=llama, precision=FP32)
    assert chosen.name == "vllm" and "LlamaForCausalLM" in chosen.reason

    unknown = choose_backend(
        "auto", device="cpu", config={**llama, "architectures": ["BioGptForCausalLM"]}, precision=FP32
    )
    assert unknown.name == "transformers"
    assert unknown.reason == "architecture BioGptForCausalLM is not supported by vLLM: using transformers"

    narrow = choose_backend("auto", device="cpu", config={**llama, "hidden_size": 64}, precision=FP32)
    assert narrow.name == "transformers" and "head size 16" in narrow.reason

    assert choose_backend("transformers", device="cpu", config=llama, precision=FP32).reason == "BACKEND=transformers"


def test_enforce_eager_reaches_vllm_and_defaults_per_device(tiny_llama_dir: Path, install_model) -> None:
    from runners.local_cache import find_local
    from runners.names import parse_model_name
    from runners.vllm import EAGER_BY_DEFAULT, engine_args
    from settings import Settings

    install_model(tiny_llama_dir, "test-org/eager")
    local = find_local(parse_model_name("test-org/eager"))
    assert local is not None
    for device in ("cpu", "cuda"):
        args = {
            setting: engine_args(local, FP32, device, False, Settings(enforce_eager=setting)).enforce_eager
            for setting in (None, True, False)
        }
        assert args == {None: EAGER_BY_DEFAULT[device], True: True, False: False}


class TestBackendVllm:
    @pytest.fixture(scope="class")
    def url(self, vllm_env: dict[str, str]) -> Iterator[str]:
        env = {**vllm_env, "BACKEND": "vllm", "MAX_CACHE_MODELS": "2", "MAX_BATCH_SIZE": "2", "MAX_QUEUE": "0"}
        with in_process_server(env) as url:
            yield url

    def test_chat_runs_on_vllm_with_true_counts(self, url: str) -> None:
        from transformers import AutoTokenizer

        r = httpx.post(
            f"{url}/chat", json=chat_body(SMALL, "count my tokens", max_tokens=12, temperature=0), timeout=120
        )
        assert r.status_code == 200, r.text
        body = r.json()
        tokenizer = AutoTokenizer.from_pretrained(model_entry(url, SMALL)["local_path"])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "count my tokens"}], add_generation_prompt=True
        )
        assert body["prompt_eval_count"] == len(prompt["input_ids"])
        assert body["done_reason"] == "length" and body["eval_count"] == 12
        entry = model_entry(url, SMALL)
        assert entry["backend"] == "vllm" and entry["backend_reason"].startswith("BACKEND=vllm")
        [loaded] = httpx.get(f"{url}/status").json()["loaded_models"]
        assert loaded["backend"] == "vllm" and loaded["memory_bytes"] > 0
        expected = "bf16" if bf16_cpu_feature() else "fp32"  # the checkpoint is bf16
        assert entry["quantization"] == expected
        assert str(running_engine().model_config.dtype) == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[expected]
        assert running_engine().model_config.enforce_eager is True  # ENFORCE_EAGER=true (vllm_env)

    def test_a_prompt_no_tokenization_could_fit_is_refused_before_tokenizing(self, url: str) -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": SMALL, "prompt": "b" * 2_000_000}, timeout=120)
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"]

    def test_generate_streams_deltas_as_produced(self, url: str) -> None:
        body = {"model": SMALL, "prompt": "tell me a story", "options": {"num_predict": 24, "temperature": 0}}
        with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=120) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line]
        pieces, final = lines[:-1], lines[-1]
        assert len(pieces) > 5 and all(p["response"] and not p["done"] for p in pieces)
        assert final["done"] is True and final["done_reason"] == "length" and final["eval_count"] == 24

    def test_stop_sequence_ends_the_output_before_it(self, url: str) -> None:
        def generate(**options: object) -> dict:
            body = {
                "model": SMALL,
                "prompt": "list the colors",
                "stream": False,
                "options": {"num_predict": 40, "temperature": 0, **options},
            }
            return httpx.post(f"{url}/api/generate", json=body, timeout=120).json()

        full = generate()["response"]
        at = next(i for i in range(8, len(full) - 3) if full.find(full[i : i + 3]) == i)  # a first occurrence
        stopped = generate(stop=[full[at : at + 3]])
        assert stopped["response"] == full[:at] and stopped["done_reason"] == "stop"

    def test_seed_reproduces_a_sampled_output(self, url: str) -> None:
        def sample(seed: int) -> str:
            body = chat_body(
                SMALL,
                "surprise me",
                stream=False,
                options={"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed, "num_predict": 24},
            )
            return httpx.post(f"{url}/api/chat", json=body, timeout=120).json()["message"]["content"]

        first = sample(7)
        assert sample(7) == first
        assert sample(8) != first

    def test_logprobs_are_each_sampled_token_with_the_best_alternatives(self, url: str) -> None:
        body = chat_body(SMALL, "hi", max_tokens=6, ignore_eos=True, temperature=0, logprobs=True, top_logprobs=3)
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        entries = r.json()["choices"][0]["logprobs"]["content"]
        assert len(entries) == r.json()["usage"]["completion_tokens"] == 6
        for entry in entries:
            best = [alternative["logprob"] for alternative in entry["top_logprobs"]]
            assert len(best) == 3 and best == sorted(best, reverse=True), entry
            assert entry["logprob"] == pytest.approx(best[0])  # greedy: the sampled token is the likeliest

    def test_json_schema_output_matches_the_schema(self, url: str) -> None:
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
            "required": ["ok", "color"],
        }
        ollama = httpx.post(
            f"{url}/api/chat",
            json=chat_body(SMALL, "answer in JSON", stream=False, format=schema, options={"num_predict": 40}),
            timeout=120,
        ).json()
        jsonschema.validate(json.loads(ollama["message"]["content"]), schema)
        openai = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={
                **chat_body(SMALL, "answer in JSON"),
                "max_tokens": 40,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            },
        ).json()
        jsonschema.validate(json.loads(openai["choices"][0]["message"]["content"]), schema)
        assert openai["choices"][0]["finish_reason"] == "stop" and openai["usage"]["completion_tokens"] > 0

    def test_client_disconnect_aborts_the_request_in_the_engine(self, url: str) -> None:
        body = {
            "model": SMALL,
            "prompt": "go on forever",
            "max_tokens": CONTEXT - 64,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            events = [json.loads(line.removeprefix("data: ")) for line in islice(filter(None, r.iter_lines()), 3)]
            assert all(event["choices"][0]["finish_reason"] is None for event in events), events
            assert running_engine().get_num_unfinished_requests() == 1
        # ~16k tokens to go, ~25 s at this machine's ~600 tokens/s: only an abort frees the engine within
        # 10 s. (2 s was too tight for a loaded CI machine, where noticing the disconnect waits its turn.)
        deadline = time.monotonic() + 10
        while running_engine().get_num_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_engine().get_num_unfinished_requests() == 0
        assert model_entry(url, SMALL)["loaded"] is True

    def test_requests_beyond_batch_and_queue_limits_get_503(self, url: str) -> None:
        body = {"model": SMALL, "prompt": "go on", "max_tokens": CONTEXT - 64, "ignore_eos": True, "stream": True}
        with (
            httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120),
            httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120),
        ):
            assert running_engine().get_num_unfinished_requests() == 2
            busy = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=120)
        assert busy.status_code == 503 and "MAX_BATCH_SIZE=2, MAX_QUEUE=0" in busy.json()["error"]["message"]

    def test_embeddings_of_a_model_generating_on_vllm(self, url: str) -> None:
        """vLLM's generation engine cannot embed: a transformers runner of the same weights does,
        beside the engine, in the pool's memory accounting, without evicting the engine."""
        texts = ["the sky is blue", "grass is green"]
        ollama = httpx.post(f"{url}/api/embed", json={"model": SMALL, "input": texts}, timeout=120)
        assert ollama.status_code == 200, ollama.text
        vectors = ollama.json()["embeddings"]
        [embedder] = [e for e in httpx.get(f"{url}/status").json()["loaded_models"] if e["purpose"] == "embed"]
        # The reference computes in float32; a runner in bf16 (on CPUs with AVX512-BF16) differs by its rounding.
        tolerance = 1e-4 if embedder["quantization"] == "fp32" else 5e-3
        for vector, expected in zip(
            vectors, reference_embeddings(model_entry(url, SMALL)["local_path"], texts), strict=True
        ):
            assert vector == pytest.approx(expected, abs=tolerance)
        openai = httpx.post(
            f"{url}/v1/embeddings", json={"model": SMALL, "input": texts, "encoding_format": "float"}, timeout=120
        )
        assert openai.status_code == 200, openai.text
        assert openai.json()["usage"]["prompt_tokens"] == ollama.json()["prompt_eval_count"] > 0
        for d, vector in zip(openai.json()["data"], vectors, strict=True):
            assert d["embedding"] == pytest.approx(vector, abs=1e-6)

        status = httpx.get(f"{url}/status").json()
        entries = {e["purpose"]: e for e in status["loaded_models"] if e["model"] == SMALL}
        assert entries["generate"]["backend"] == "vllm" and entries["embed"]["backend"] == "transformers"
        assert "vLLM's generation engine cannot embed" in entries["embed"]["backend_reason"]
        assert status["memory_in_use_bytes"] == sum(e["memory_bytes"] for e in status["loaded_models"])
        chat = httpx.post(
            f"{url}/api/chat", json=chat_body(SMALL, stream=False, options={"num_predict": 2}), timeout=120
        )
        assert chat.status_code == 200 and model_entry(url, SMALL)["backend"] == "vllm"

    def test_backend_vllm_refuses_a_model_vllm_cannot_run(self, url: str) -> None:
        r = httpx.post(f"{url}/api/chat", json=chat_body(LARGE, stream=False), timeout=120)
        assert r.status_code == 500
        assert "BACKEND=vllm, but vLLM cannot serve this model" in r.json()["error"]
        assert "cannot run bitsandbytes 4-bit" in r.json()["error"]

    def test_keep_alive_zero_shuts_the_engine_down(self, url: str) -> None:
        assert engine_processes(), "the engine runs in processes of its own"
        r = httpx.post(
            f"{url}/api/generate",
            json={"model": SMALL, "prompt": "bye", "keep_alive": 0, "stream": False, "options": {"num_predict": 2}},
            timeout=120,
        )
        assert r.status_code == 200
        assert model_entry(url, SMALL)["loaded"] is False
        assert engine_processes() == []


class TestBackendAuto:
    @pytest.fixture(scope="class")
    def url(self, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        tmp = tmp_path_factory.mktemp("auto")
        env = {
            **vllm_env,
            "BACKEND": "auto",
            "MAX_CACHE_MODELS": "1",
            "BENTOML_HOME": str(tmp / "bentoml"),
            "TMPDIR": str(tmp),
        }
        with running_server(env, tmp / "server.log") as url:
            yield url

    def test_auto_takes_vllm_and_says_why(self, url: str) -> None:
        r = httpx.post(f"{url}/api/chat", json=chat_body(SMALL, stream=False, options={"num_predict": 4}), timeout=180)
        assert r.status_code == 200, r.text
        entry = model_entry(url, SMALL)
        assert entry["backend"] == "vllm"
        assert entry["backend_reason"] == "BACKEND=auto: vLLM supports LlamaForCausalLM on cpu"
        assert engine_processes()

    def test_auto_embeds_with_every_model(self, url: str) -> None:
        """Under the default settings a model vLLM generates with embeds too (Open WebUI's retrieval,
        litellm and ollama-js `embed` need it), and the engine stays loaded beside its embedder
        although MAX_CACHE_MODELS=1: they are one model."""
        r = httpx.post(f"{url}/api/embed", json={"model": SMALL, "input": "the sky is blue"}, timeout=180)
        assert r.status_code == 200, r.text
        assert len(r.json()["embeddings"][0]) == 128
        loaded = httpx.get(f"{url}/status").json()["loaded_models"]
        assert sorted((e["model"], e["purpose"], e["backend"]) for e in loaded) == [
            (SMALL, "embed", "transformers"),
            (SMALL, "generate", "vllm"),
        ]
        assert engine_processes()

    def test_auto_falls_back_with_a_reason_and_eviction_ends_the_engine(self, url: str) -> None:
        r = httpx.post(f"{url}/api/chat", json=chat_body(LARGE, stream=False, options={"num_predict": 4}), timeout=180)
        assert r.status_code == 200, r.text
        entry = model_entry(url, LARGE)
        assert entry["backend"] == "transformers" and entry["quantization"] == "nf4"
        assert entry["backend_reason"].endswith("on CPU cannot run bitsandbytes 4-bit: using transformers")
        [status] = httpx.get(f"{url}/status").json()["loaded_models"]
        assert status["model"] == LARGE and status["backend_reason"] == entry["backend_reason"]
        # MAX_CACHE_MODELS=1: loading LARGE evicted SMALL, and its engine is gone with it.
        assert model_entry(url, SMALL)["loaded"] is False
        assert engine_processes() == []
