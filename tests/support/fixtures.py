"""Pytest fixtures: the tiny models, the local Hub, PostgreSQL, and the in-process server (`serve`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
from starlette.testclient import TestClient

from .hub_server import LocalHub
from .postgres import PostgresServer
from .server_process import service_asgi_app
from .tiny_models import HERMES_TEMPLATE, HERMES_TOKENS, build_tiny_gpt2, build_tiny_llama

TINY_LLAMA = "test-org/tiny-llama"
TINY_GPT2 = "test-org/tiny-gpt2"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a chat template, built once per session. Do not modify it."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 without a chat template, built once per session. Do not modify it."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-style model: Hermes tool calls and <think> reasoning (tests/support/tool_models.py).

    Hidden size 128 (head size 32): vLLM's CPU attention has kernels for it."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("qwen"),
        chat_template=HERMES_TEMPLATE,
        extra_tokens=HERMES_TOKENS,
        hidden_size=128,
        seed=1,
    )


@pytest.fixture
def local_hub(
    tmp_path: Path, tiny_llama_dir: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalHub]:
    """A running LocalHub serving TINY_LLAMA and TINY_GPT2, with HF_ENDPOINT pointing at it for subprocesses.

    In-process huggingface_hub calls need `endpoint=local_hub.endpoint` (HF_ENDPOINT is read at import).
    Telemetry is off in and out of process: otherwise the first request of a process also fetches
    `{HF_ENDPOINT}/api/agent-harnesses` (huggingface.co in process, whatever `endpoint=` says).
    """
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_repo(TINY_LLAMA, tiny_llama_dir)
        hub.add_repo(TINY_GPT2, tiny_gpt2_dir)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the run (Debian's package; `make test` installs it); each test
    takes an empty database of its own with `new_database()`."""
    server = PostgresServer().start()
    yield server
    server.stop()


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
