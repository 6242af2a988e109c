"""The fixtures every test module can use: tiny models in a private HF cache, and the real service
app in-process (`serve`; tests/support/server_process.py is the one server launcher).

Nothing here mocks the server: `serve()` builds the BentoML service's own ASGI app (startup hooks,
mounted routes, streaming) and tests talk HTTP to it. The Hugging Face Hub cannot exist on this
machine, so models are built locally and placed in a temporary cache (or served by LocalHub).
Helpers (constants, request bodies, launchers) live in tests/support, and tests import them from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.fixtures import local_hub, postgres, qwen_dir, serve, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401 - fixtures
from tests.support.server_process import UNREACHABLE_HUB
from tests.support.tiny_models import (
    build_broken_model,
    build_remote_code_model,
    install_into_hf_cache,
)


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
