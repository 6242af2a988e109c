"""Shared fixtures: tiny models in a private HF cache, and the real service app in-process.

Nothing here mocks the server: `serve()` builds the BentoML service's own ASGI app (startup hooks,
mounted routes, streaming) and tests talk HTTP to it. The Hugging Face Hub cannot exist on this
machine, so models are built locally and placed in a temporary cache (or served by LocalHub).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.support.fixtures import local_hub, postgres, qwen_dir, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401 - fixtures
from tests.support.tiny_models import (
    build_broken_model,
    build_remote_code_model,
    install_into_hf_cache,
)

# Chat must never reach the network: point the Hub client at a closed loopback port by default.
UNREACHABLE_HUB = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def broken_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_broken_model(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="session")
def remote_code_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_remote_code_model(tmp_path_factory.mktemp("remote-code"))


@pytest.fixture
def hf_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty Hugging Face cache for this test (HF_HOME points at it)."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", os.environ.get("HF_ENDPOINT", UNREACHABLE_HUB))
    return home / "hub"


@pytest.fixture
def install_model(hf_hub_cache: Path) -> Callable[[Path, str], Path]:
    """Place a built model folder in the test's HF cache under `repo_id`; returns the snapshot path."""

    def install(src: Path, repo_id: str) -> Path:
        return install_into_hf_cache(src, hf_hub_cache, repo_id)

    return install


@lru_cache(maxsize=1)
def service_asgi_app():
    """The BentoML service's ASGI app, built once: BentoML registers process-wide Prometheus
    metrics when it builds the app. Each TestClient still runs the lifespan, which creates a fresh
    service instance (and Runtime, reading the environment) per test."""
    from service import AIServer

    return AIServer.to_asgi()


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_hub_cache: Path) -> Iterator[Callable[..., TestClient]]:
    """Start the real service app in-process with extra environment settings; returns a client.

    `serve(MAX_CACHE_MODELS="1")` → a TestClient whose startup hooks have run. Calling it again
    stops the previous server first (one service instance per process, as in production), like a
    restart. Stopped at teardown.
    """
    started: list[TestClient] = []

    def stop_all() -> None:
        while started:
            started.pop().__exit__(None, None, None)

    def start(**env: str) -> TestClient:
        stop_all()
        monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        client = TestClient(service_asgi_app())
        client.__enter__()
        started.append(client)
        return client

    yield start
    stop_all()


def current_runtime():
    """The running server's Runtime, for tests that check real memory release."""
    from service import app

    return app.state.runtime


def chat_body(model: str, text: str = "hello", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
