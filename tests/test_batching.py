"""Continuous batching in the transformers runner: correctness, not speed.

Requests decoded together must get exactly what they get alone: batching only changes when their
tokens are computed, never which tokens. Cancelling and queueing need real sockets (the in-process
test client buffers whole responses), so those tests run `bentoml serve`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.support.server_process import UNREACHABLE_HUB, running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache

MODEL = "test-org/tiny-llama"

# Different prompt lengths (so rows are padded differently), lengths, stops and sampling settings.
REQUESTS = [
    {"prompt": "hello", "max_tokens": 800, "temperature": 0, "ignore_eos": True},
    {"prompt": "a much longer prompt about the weather and the sea " * 3, "max_tokens": 240, "temperature": 0},
    {"prompt": "story time", "max_tokens": 600, "temperature": 1.0, "seed": 7, "top_k": 50},
    {"prompt": "numbers", "max_tokens": 500, "temperature": 0.7, "seed": 1, "top_p": 0.8, "presence_penalty": 0.5},
    {"prompt": "x", "max_tokens": 700, "temperature": 0, "stop": ["e"]},
    {"prompt": "the end", "max_tokens": 100, "temperature": 1.2, "seed": 99, "ignore_eos": True},
]
# Long enough that, uncancelled, it would still be decoding when the test ends.
ENDLESS = {"model": MODEL, "prompt": "go on", "max_tokens": 8000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("long"), context=8192)


def serve(tmp_path: Path, model: Path, **env: str):
    """`with serve(tmp_path, model, MAX_BATCH_SIZE="4") as url:` a real server with `model` pulled as MODEL."""
    install_into_hf_cache(model, tmp_path / "hf" / "hub", MODEL)
    base = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(tmp_path / "data"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    return running_server({**base, **env}, tmp_path / "server.log")


@pytest.fixture
def start(tmp_path: Path, long_context_model: Path) -> Callable[..., Iterator[str]]:
    """`with start(MAX_BATCH_SIZE="4") as url:` a real server with the long-context model pulled."""
    return partial(serve, tmp_path, long_context_model)


def complete(url: str, spec: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **spec}, timeout=600)  # a loaded machine is slow
    assert r.status_code == 200, r.text
    body = r.json()
    return {
        "text": body["choices"][0]["text"],
        "finish": body["choices"][0]["finish_reason"],
        "tokens": body["usage"]["completion_tokens"],
    }


def running(url: str) -> int:
    models = httpx.get(f"{url}/status", timeout=60).json()["loaded_models"]
    return sum(m["running_requests"] for m in models)


def wait_for_empty_batch(url: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while running(url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running(url) == 0


class BatchWatcher:
    """Samples the running batch size while requests run, to show they really shared batches."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> BatchWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.largest = max(self.largest, running(self.url))
            time.sleep(0.002)


def test_batched_requests_get_exactly_their_solo_outputs_and_cancel_alone(start) -> None:
    with start(MAX_BATCH_SIZE="8", MAX_QUEUE="8") as url:
        alone = [complete(url, spec) for spec in REQUESTS]
        assert alone[0]["tokens"] == 800 and alone[0]["finish"] == "length"
        assert alone[4]["finish"] == "stop" and "e" not in alone[4]["text"]

        def abandon() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=ENDLESS, timeout=60) as r:
                lines = r.iter_lines()
                for _ in range(5):
                    next(lines)
            # leaving the block closes the connection: the request is cancelled in the batch

        with BatchWatcher(url) as watcher, ThreadPoolExecutor(len(REQUESTS) + 1) as pool:
            cancelled = pool.submit(abandon)
            together = list(pool.map(lambda spec: complete(url, spec), REQUESTS))
            cancelled.result()
        assert watcher.largest >= 3, "the requests never shared a batch"
        assert together == alone
        wait_for_empty_batch(url)  # the abandoned request left the batch instead of decoding on


def test_a_full_queue_answers_503_with_retry_after(start) -> None:
    with start(MAX_BATCH_SIZE="1", MAX_QUEUE="0") as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=ENDLESS, timeout=60) as held:
            lines = held.iter_lines()  # kept: a discarded iterator closes the response, cancelling it
            next(lines)  # the one batch slot is taken
            post = httpx.Client(base_url=url, timeout=60).post
            busy = post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            ollama_busy = post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
            native_busy = post(
                "/chat", json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            )
            anthropic_busy = post(
                "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert running(url) == 1
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert "MAX_QUEUE" in busy.json()["error"]["message"]
        assert ollama_busy.status_code == 503 and "server busy" in ollama_busy.json()["error"]
        assert native_busy.status_code == 503  # a stream that cannot start fails before its first byte
        # Anthropic's status for "overloaded", which its SDKs retry.
        assert anthropic_busy.status_code == 529 and anthropic_busy.json()["error"]["type"] == "overloaded_error"
        wait_for_empty_batch(url)  # the held stream's client left: its slot frees
        assert (
            httpx.post(
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
            ).status_code
            == 200
        )


def test_a_long_prompt_prefilled_in_chunks_beside_a_running_stream_changes_neither_output(start) -> None:
    """A prompt of several PREFILL_CHUNKs is prefilled a chunk per decode step of the running
    stream (runners/batching.py), while that stream decodes over the shared slot cache."""
    from runners.batching import PREFILL_CHUNK

    running_spec = {"prompt": "hello", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    long_spec = {"prompt": "the tide came in over the rocks " * 150, "max_tokens": 30, "temperature": 0}
    with start(MAX_BATCH_SIZE="4") as url:
        usage = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, **long_spec, "max_tokens": 1}, timeout=600
        ).json()["usage"]
        assert usage["prompt_tokens"] > 2 * PREFILL_CHUNK  # at least three chunks
        alone = [complete(url, running_spec), complete(url, long_spec)]
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(complete, url, running_spec)
            deadline = time.monotonic() + 60
            while running(url) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = complete(url, long_spec)
            together = [first.result(), second]
        assert together == alone


def test_a_bf16_model_batched_on_the_cpu_kernels_gets_its_solo_outputs(tmp_path: Path) -> None:
    """A bf16 checkpoint with 64-wide heads takes the engine's CPU fast paths (packed weights, and
    the C++ decode attention where this machine can build it, runners/native_kernels.py): batched,
    each request still gets what it gets alone (tests/unit/test_native_kernels.py shows such a model
    takes the kernel)."""
    source = build_tiny_llama(tmp_path / "bf16", hidden_size=256, heads=4, layers=2, context=2048, dtype="bfloat16")
    specs = [spec for spec in REQUESTS if spec["max_tokens"] <= 600]
    # BACKEND=auto would serve a bf16 Llama on CPU with vLLM.
    with serve(tmp_path, source, MAX_BATCH_SIZE="8", BACKEND="transformers") as url:
        alone = [complete(url, spec) for spec in specs]
        with BatchWatcher(url) as watcher, ThreadPoolExecutor(len(specs)) as pool:
            together = list(pool.map(lambda spec: complete(url, spec), specs))
        assert watcher.largest >= 3, "the requests never shared a batch"
        assert together == alone
