"""The real server: `bentoml serve` in a subprocess, driven over a socket with httpx."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.bodies import chat_body
from tests.support.server_process import UNREACHABLE_HUB, running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache

MODEL = "test-org/tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("server")
    # A larger tiny model, so a long generation takes long enough to observe concurrency.
    src = build_tiny_llama(root / "src", hidden_size=128, layers=4)
    install_into_hf_cache(src, root / "hf" / "hub", MODEL)
    # The transformers runner on purpose: where vLLM is installed, `auto` would pick it for this model.
    env = {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
        "BACKEND": "transformers",
    }
    with running_server(env, root / "server.log") as url:
        yield url


def test_serves_chat_over_http(server: str) -> None:
    r = httpx.post(f"{server}/chat", json=chat_body(MODEL, max_tokens=4), timeout=60)
    assert r.status_code == 200 and r.json()["done"] is True
    assert httpx.get(f"{server}/models").json()["models"][0]["loaded"] is True
    assert httpx.post(f"{server}/chat", json=chat_body("../x")).status_code == 400


def test_concurrent_streams_to_one_model_both_progress(server: str) -> None:
    """Two long streams started together: each receives tokens while the other is still going.
    Served one after the other behind a lock, their receive windows would not overlap."""
    httpx.post(f"{server}/chat", json=chat_body(MODEL, max_tokens=1), timeout=60)  # load first
    windows: dict[int, list[float]] = {}
    start = threading.Barrier(2)

    def consume(i: int) -> None:
        times: list[float] = []
        start.wait()
        body = chat_body(MODEL, text=f"story {i}", max_tokens=300, temperature=0, stream=True)
        with httpx.stream("POST", f"{server}/chat", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("delta", {}).get("content"):
                    times.append(time.monotonic())
        windows[i] = times

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a, b) = windows[0], windows[1]
    assert len(a) > 50 and len(b) > 50
    assert b[0] < a[-1] and a[0] < b[-1], "streams did not overlap: requests were serialized"
    # Not merely touching at the edges: a good share of each stream's tokens fall inside the other's window.
    assert sum(b[0] <= t <= b[-1] for t in a) > len(a) / 4


def test_client_disconnect_releases_the_model(server: str) -> None:
    body = chat_body(MODEL, max_tokens=400, stream=True)
    with httpx.stream("POST", f"{server}/chat", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [entry] = httpx.get(f"{server}/status").json()["loaded_models"]
        if entry["active_requests"] == 0:
            break
        time.sleep(0.1)
    assert entry["active_requests"] == 0
