"""Prometheus metrics on BentoML's /metrics, after real requests to a real `bentoml serve`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server_process import UNREACHABLE_HUB, running_server
from tests.support.tiny_models import install_into_hf_cache

MODEL = "test-org/tiny-llama"
KEY = "metrics-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("metrics")
    install_into_hf_cache(tiny_llama_dir, root / "hf" / "hub", MODEL)
    env = {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
        "API_KEYS": KEY,
    }
    with (
        running_server(env, root / "server.log") as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client,
    ):
        yield client


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics, keyed by name and labels."""
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_sampled(client: httpx.Client, timeout: float = 30.0) -> dict[tuple[str, frozenset], float]:
    """/metrics once the gauges (sampled every second) show the model loaded and idle: polled for,
    not waited for by a fixed sleep."""
    running = ("num_requests_running", frozenset({("model", MODEL)}))
    deadline = time.monotonic() + timeout
    samples = scrape(client)
    while not (value(samples, "models_loaded") == 1 and samples.get(running) == 0) and time.monotonic() < deadline:
        time.sleep(0.1)
        samples = scrape(client)
    return samples


def test_generation_request_and_model_metrics(server: httpx.Client) -> None:
    chats = [
        server.post(
            "/chat",
            json={
                "model": MODEL,
                "max_tokens": n,
                "temperature": 0,
                "messages": [{"role": "user", "content": "count"}],
            },
        ).json()
        for n in (5, 9)
    ]
    streamed = server.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "hi",
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    usage = json.loads(streamed.text.split("data: ")[-2])["usage"]
    assert (
        server.post(
            "/chat", json={"model": "test-org/absent", "messages": [{"role": "user", "content": "x"}]}
        ).status_code
        == 404
    )
    assert server.get("/jobs/not-a-job").status_code == 404
    assert server.get("/jobs/another-job", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server.get("/no/such/path").status_code == 404
    samples = scrape_sampled(server)
    # Requests by route template and status: job ids and unknown paths are not label values.
    assert value(samples, "requests_total", endpoint="/chat", method="POST", status="200") == 2
    assert value(samples, "requests_total", endpoint="/chat", method="POST", status="404") == 1
    assert value(samples, "requests_total", endpoint="/v1/completions", method="POST", status="200") == 1
    assert value(samples, "requests_total", endpoint="/jobs/{job_id}", method="GET", status="404") == 1
    assert value(samples, "requests_total", endpoint="/jobs/{job_id}", method="GET", status="401") == 1
    endpoints = {dict(labels).get("endpoint") for name, labels in samples if name == "requests_total"}
    assert "/no/such/path" not in endpoints
    # Tokens and latencies, once per generation.
    generated = sum(c["eval_count"] for c in chats) + usage["completion_tokens"]
    assert value(samples, "generation_tokens_total", model=MODEL) == generated
    prompts = sum(c["prompt_eval_count"] for c in chats) + usage["prompt_tokens"]
    assert value(samples, "prompt_tokens_total", model=MODEL) == prompts
    assert value(samples, "time_to_first_token_seconds_count", model=MODEL) == 3
    assert value(samples, "e2e_request_latency_seconds_count", model=MODEL) == 3
    assert value(samples, "inter_token_latency_seconds_count", model=MODEL) == 3
    assert 0 < value(samples, "time_to_first_token_seconds_sum", model=MODEL) < 60
    # The model: loaded once, on transformers; now idle.
    assert value(samples, "model_load_seconds_count", model=MODEL, backend="transformers") == 1
    assert value(samples, "models_loaded") == 1
    assert (name := ("num_requests_running", frozenset({("model", MODEL)}))) in samples and samples[name] == 0
    assert value(samples, "num_requests_waiting", model=MODEL) == 0
