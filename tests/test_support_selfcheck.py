"""The test support code does what the rest of the suite relies on: tiny models, cache installs, LocalHub.

Fixtures `tiny_llama_dir`, `tiny_gpt2_dir` and `local_hub` come from tests/support/fixtures.py via conftest.py.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.fixtures import TINY_LLAMA
from tests.support.hub_server import LocalHub
from tests.support.tiny_models import (
    build_broken_model,
    build_remote_code_model,
    build_tiny_llama,
    install_into_hf_cache,
)


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and not filecmp.cmpfiles(a, b, names, shallow=False)[1]


# -- tiny models ----------------------------------------------------------------------------------------
def test_tiny_llama_chats_and_generates(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    messages = [{"role": "user", "content": "Hello!"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nHello!</s>\n<|assistant|>\n"
    )
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_same_seed_same_bytes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert _same_files(build_tiny_llama(tmp_path / "again"), tiny_llama_dir)
    other = build_tiny_llama(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_llama_dir / "model.safetensors").read_bytes()


def test_tiny_gpt2_has_no_chat_template(tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert tok.chat_template is None
    out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=3, min_new_tokens=3)
    assert out.shape[1] == len(tok("Once upon a time")["input_ids"]) + 3


def test_broken_model_fails_at_load(tmp_path: Path) -> None:
    path = build_broken_model(tmp_path / "broken")
    AutoTokenizer.from_pretrained(path)  # everything but the weights is fine
    with pytest.raises(SafetensorError):
        AutoModelForCausalLM.from_pretrained(path)


def test_remote_code_model_needs_trust(tmp_path: Path) -> None:
    path = build_remote_code_model(tmp_path / "remote")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)


# -- HF cache ---------------------------------------------------------------------------------------------
def test_install_into_hf_cache_is_a_real_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub-cache"
    snapshot = install_into_hf_cache(tiny_llama_dir, cache, TINY_LLAMA)
    (repo,) = scan_cache_dir(cache).repos
    assert (repo.repo_id, set(repo.refs), repo.nb_files) == (TINY_LLAMA, {"main"}, 6)
    assert snapshot_download(TINY_LLAMA, cache_dir=cache, local_files_only=True) == str(snapshot)
    assert snapshot.name == LocalHub(tmp_path / "hub").add_repo(TINY_LLAMA, tiny_llama_dir)  # same commit
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, cache_dir=cache, local_files_only=True)
    assert model.config.model_type == "llama"


# -- LocalHub -----------------------------------------------------------------------------------------------
def test_snapshot_download_through_local_hub(local_hub: LocalHub, tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = snapshot_download(TINY_LLAMA, cache_dir=tmp_path / "cache", endpoint=local_hub.endpoint)
    assert _same_files(Path(path), tiny_llama_dir)
    assert Path(path).name == local_hub.commit(TINY_LLAMA)
    assert ("GET", f"/api/models/{TINY_LLAMA}/revision/main") in [(r.method, r.path) for r in local_hub.requests]


@pytest.mark.parametrize(
    ("repo_id", "revision", "filename", "error"),
    [
        ("test-org/missing", "main", "config.json", RepositoryNotFoundError),
        (TINY_LLAMA, "v9", "config.json", RevisionNotFoundError),
        (TINY_LLAMA, "main", "missing.bin", EntryNotFoundError),
    ],
)
def test_hub_errors_map_to_hf_exceptions(
    local_hub: LocalHub, tmp_path: Path, repo_id: str, revision: str, filename: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        hf_hub_download(repo_id, filename, revision=revision, cache_dir=tmp_path, endpoint=local_hub.endpoint)


def test_missing_and_gated_repos_in_snapshot_download(local_hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test-org/missing", cache_dir=tmp_path, endpoint=local_hub.endpoint)
    local_hub.gated.add(TINY_LLAMA)
    with pytest.raises(GatedRepoError):
        snapshot_download(TINY_LLAMA, cache_dir=tmp_path, endpoint=local_hub.endpoint)


def test_transformers_loads_through_hf_endpoint(local_hub: LocalHub, tmp_path: Path) -> None:
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], cache_dir=sys.argv[2])\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(type(m).__name__, t.chat_template is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, TINY_LLAMA, str(tmp_path / "cache")],
        env=os.environ,  # HF_ENDPOINT, HF_HOME set by the fixture
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LlamaForCausalLM", "True"]
    assert any(r.path.endswith("/model.safetensors") and r.method == "GET" for r in local_hub.requests)


def test_cut_download_resumes_with_range(
    local_hub: LocalHub, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub keeps only whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks of a cut transfer: shrink it.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    local_hub.fail_after_bytes = 100_000
    path = hf_hub_download(TINY_LLAMA, "model.safetensors", cache_dir=tmp_path, endpoint=local_hub.endpoint)
    assert filecmp.cmp(path, tiny_llama_dir / "model.safetensors", shallow=False)
    ranges = [r.headers.get("Range") for r in local_hub.requests if r.path.endswith("/model.safetensors")]
    assert ranges[-1] == f"bytes={100_000 // (16 * 1024) * 16 * 1024}-"


def test_throttle_slows_downloads(local_hub: LocalHub, tmp_path: Path) -> None:
    def timed_download(cache: Path) -> float:
        began = time.monotonic()
        hf_hub_download(TINY_LLAMA, "model.safetensors", cache_dir=cache, endpoint=local_hub.endpoint)
        return time.monotonic() - began

    fast = timed_download(tmp_path / "fast")
    local_hub.throttle_bytes_per_sec = 2_000_000  # model.safetensors is ~1.3 MB
    slow = timed_download(tmp_path / "slow")
    assert slow > 0.5 > fast


def test_download_survives_a_hub_restart(
    local_hub: LocalHub, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    local_hub.throttle_bytes_per_sec = 1_000_000
    result: list[str] = []
    thread = threading.Thread(
        target=lambda: result.append(
            hf_hub_download(TINY_LLAMA, "model.safetensors", cache_dir=tmp_path, endpoint=local_hub.endpoint)
        )
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not any(r.method == "GET" and r.path.endswith("/model.safetensors") for r in local_hub.requests):
        assert time.monotonic() < deadline, "download never started"
        time.sleep(0.01)
    time.sleep(0.2)
    local_hub.stop()  # cuts the transfer mid-body
    local_hub.throttle_bytes_per_sec = None
    local_hub.start()  # same port; the client retries after 1 s with a Range request
    thread.join(timeout=30)
    assert result and filecmp.cmp(result[0], tiny_llama_dir / "model.safetensors", shallow=False)
    assert any((r.headers.get("Range") or "").startswith("bytes=") for r in local_hub.requests)
