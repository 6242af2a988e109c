"""Cache completeness (runners/local_cache.py): a snapshot counts as pulled only when its config,
every weight shard its index names and every linked blob are there, and no download is running.

The cache is a real folder in huggingface_hub's layout, written by the test (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runners.local_cache import PULL_MARKER, find_local, list_local
from runners.names import ModelRef

COMMIT = "a" * 40
REF = ModelRef("org/model")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def write_snapshot(cache: Path, files: dict[str, str], *, ref: str = "main") -> Path:
    root = cache / "models--org--model"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


def test_a_complete_snapshot_is_found_with_its_sizes(cache: Path) -> None:
    snapshot = write_snapshot(cache, {"config.json": "{}", "model.safetensors": "x" * 10})
    local = find_local(REF)
    assert local is not None and local.path == snapshot and local.commit == COMMIT
    assert local.weight_bytes == 10 and local.size_bytes == 12
    assert [m.ref for m in list_local()] == [REF]


@pytest.mark.parametrize("files", [{"model.safetensors": "x"}, {"config.json": "{}", "README.md": "no weights"}])
def test_without_config_or_weights_it_is_not_pulled(cache: Path, files: dict[str, str]) -> None:
    write_snapshot(cache, files)
    assert find_local(REF) is None


def test_a_shard_named_by_the_index_but_missing_makes_it_incomplete(cache: Path) -> None:
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    files = {"config.json": "{}", "model.safetensors.index.json": json.dumps(index), "model-1.safetensors": "x"}
    write_snapshot(cache, files)
    assert find_local(REF) is None
    write_snapshot(cache, {"model-2.safetensors": "y"})
    assert find_local(REF) is not None


def test_a_download_in_progress_or_a_dangling_link_hides_it(cache: Path) -> None:
    snapshot = write_snapshot(cache, {"config.json": "{}", "model.safetensors": "x"})
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir()
    (blobs / "0123.incomplete").write_text("")
    assert find_local(REF) is None
    (blobs / "0123.incomplete").unlink()
    (snapshot.parent.parent / PULL_MARKER).write_text("123")
    assert find_local(REF) is None
    (snapshot.parent.parent / PULL_MARKER).unlink()
    (snapshot / "tokenizer.json").symlink_to(blobs / "gone")
    assert find_local(REF) is None


def test_a_tag_resolves_through_its_ref_and_an_unknown_one_is_not_pulled(cache: Path) -> None:
    write_snapshot(cache, {"config.json": "{}", "model.safetensors": "x"}, ref="v1")
    assert find_local(ModelRef("org/model", "v1")) is not None
    assert find_local(ModelRef("org/model", "v2")) is None
    assert find_local(ModelRef("org/model", COMMIT)) is not None  # a commit hash names itself
