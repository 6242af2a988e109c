"""Pytest fixtures over the tiny models and the local Hub; import the ones a test module needs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest

from .hub_server import LocalHub
from .postgres import PostgresServer
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
