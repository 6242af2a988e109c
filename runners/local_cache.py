"""The local Hugging Face cache, read without any network.

Chat never downloads: this module answers "is this model pulled, completely?" and lists what is.
It reads the hub cache layout huggingface_hub writes (`models--org--name/{refs,snapshots,blobs}`).
A snapshot counts as pulled only when it is complete: config, every weight shard its index names,
no dangling links, no download in progress (`.incomplete` blobs or our own pull marker).
A PEFT adapter repository (`adapter_config.json` and its weights, no `config.json`) is a snapshot
too: runners/adapters.py serves it over the base model its config names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from errors import InvalidRequest
from runners.names import ModelRef

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PULL_MARKER = ".ai-server-pull-in-progress"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter's own config, in place of config.json


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps repos, following its own variables (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def repo_dir(repo_id: str) -> Path:
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"


@dataclass(frozen=True)
class LocalModel:
    """A complete snapshot of one model revision in the local cache."""

    ref: ModelRef
    commit: str
    path: Path
    size_bytes: int
    weight_bytes: int
    modified_at: float

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter repository rather than a model (runners/adapters.py)."""
        return not (self.path / "config.json").is_file() and (self.path / ADAPTER_CONFIG).is_file()


def find_local(ref: ModelRef) -> LocalModel | None:
    """The complete local snapshot for `ref`, or None when it is absent or unfinished."""
    root = repo_dir(ref.repo_id)
    revision = ref.revision or "main"
    ref_file = root / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    elif _COMMIT.fullmatch(revision):
        commit = revision
    else:
        return None
    return _complete_snapshot(ref, root, commit)


def list_local() -> list[LocalModel]:
    """Every complete model snapshot in the cache that a ref (branch or tag) points to."""
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    found: list[LocalModel] = []
    for root in sorted(cache.glob("models--*")):
        repo_id = root.name.removeprefix("models--").replace("--", "/")
        refs = root / "refs"
        for ref_file in sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []:
            name = ref_file.relative_to(refs).as_posix()
            ref = ModelRef(repo_id, None if name == "main" else name)
            local = _complete_snapshot(ref, root, ref_file.read_text().strip())
            if local is not None:
                found.append(local)
    return found


def _complete_snapshot(ref: ModelRef, root: Path, commit: str) -> LocalModel | None:
    snapshot = root / "snapshots" / commit
    if not _COMMIT.fullmatch(commit) or not snapshot.is_dir() or pull_in_progress(ref.repo_id):
        return None
    if any((root / "blobs").glob("*.incomplete")):
        return None
    files = [p for p in snapshot.rglob("*") if p.is_file() or p.is_symlink()]
    if any(not p.exists() for p in files):  # dangling link: a blob went missing
        return None
    names = {p.relative_to(snapshot).as_posix() for p in files}
    if not {"config.json", ADAPTER_CONFIG} & names or not _weights_complete(snapshot, names):
        return None
    size = sum(p.stat().st_size for p in files)
    weights = sum(p.stat().st_size for p in files if p.name.endswith(_WEIGHT_SUFFIXES))
    mtime = max(p.stat().st_mtime for p in files)
    return LocalModel(ref, commit, snapshot, size, weights, mtime)


def _weights_complete(snapshot: Path, names: set[str]) -> bool:
    for index_name in _INDEX_FILES:
        if index_name in names:
            try:
                shards = set(json.loads((snapshot / index_name).read_text())["weight_map"].values())
            except (ValueError, KeyError):
                return False
            return shards <= names
    return any(n.endswith(_WEIGHT_SUFFIXES) for n in names)


def pull_in_progress(repo_id: str) -> bool:
    return (repo_dir(repo_id) / PULL_MARKER).exists()


@contextmanager
def pull_marker(repo_id: str) -> Iterator[None]:
    """Mark a repo as being pulled, so a half-downloaded snapshot is never served.

    The marker survives a crash on purpose: the repo stays "not pulled" until a pull completes.
    """
    marker = repo_dir(repo_id) / PULL_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    yield
    marker.unlink(missing_ok=True)


def copy_model(source: LocalModel, destination: ModelRef) -> LocalModel:
    """Make `destination` a second name for `source` (Ollama's copy) without duplicating weights.

    The alias is an ordinary cache repo whose snapshot is a link to the source's real snapshot, so
    every lookup (and transformers itself) sees a normal, complete model. Another tag of the same
    repo needs no link, only a ref. Real files are never deleted: a copy onto the model itself (or
    an alias back onto its source) is refused, and so is a destination whose own folder for that
    revision holds other files. A destination that named another model is re-pointed, its files
    left in place (delete it first to free them).
    """
    real = source.path.resolve()
    current = find_local(destination)
    if current is not None and current.path.resolve() == real:
        raise InvalidRequest(
            f"'{destination.name}' already is '{source.ref.name}' (the same files): nothing to copy",
            param="destination",
        )
    root = repo_dir(destination.repo_id)
    snapshot = root / "snapshots" / source.commit
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink() and snapshot.resolve() != real:
        snapshot.unlink()  # a link of an older copy: only the link goes
    if not snapshot.is_symlink() and not snapshot.exists():
        snapshot.symlink_to(real, target_is_directory=True)
    elif snapshot.resolve() != real:
        raise InvalidRequest(
            f"'{destination.repo_id}' holds its own files for revision {source.commit}; "
            "delete it before copying onto it",
            param="destination",
        )
    ref_file = root / "refs" / (destination.revision or "main")
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    ref_file.write_text(source.commit)
    copied = find_local(destination)
    assert copied is not None, "a fresh alias of a complete model must be complete"
    return copied


def delete_model(ref: ModelRef) -> bool:
    """Remove one revision of a model from the cache: its ref, its snapshot unless another ref
    still uses it, and blobs no snapshot links to any more. False if it was not there.

    A snapshot that copies (`copy_model` aliases in other repos) link to is not removed from under
    them: InvalidRequest names the copies to delete first."""
    root = repo_dir(ref.repo_id)
    ref_file = root / "refs" / (ref.revision or "main")
    if not ref_file.is_file():
        return False
    commit = ref_file.read_text().strip()
    refs = root / "refs"
    other_refs = [p for p in refs.rglob("*") if p.is_file() and p != ref_file] if refs.is_dir() else []
    others = {p.read_text().strip() for p in other_refs}
    snapshot = root / "snapshots" / commit
    if commit not in others and not snapshot.is_symlink() and (copies := aliases_of(snapshot)):
        raise InvalidRequest(
            f"'{ref.name}' has copies that use its files ({', '.join(copies)}); delete them first", param="model"
        )
    ref_file.unlink()
    remaining = others
    if commit not in remaining and _COMMIT.fullmatch(commit):
        _remove_path(root / "snapshots" / commit)
    if not remaining:
        _remove_path(root)
        return True
    _remove_orphan_blobs(root)
    return True


def aliases_of(snapshot: Path) -> list[str]:
    """Names of the copies (`copy_model` aliases in other repos) whose snapshots link to `snapshot`."""
    if not snapshot.is_dir():
        return []
    real = snapshot.resolve()
    found = []
    for link in hub_cache_dir().glob("models--*/snapshots/*"):
        if link.is_symlink() and link.resolve() == real:
            alias_root = link.parents[1]
            repo_id = alias_root.name.removeprefix("models--").replace("--", "/")
            refs = alias_root / "refs"
            for ref_file in sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []:
                if ref_file.read_text().strip() == link.name:
                    name = ref_file.relative_to(refs).as_posix()
                    found.append(ModelRef(repo_id, None if name == "main" else name).name)
    return found


def _remove_orphan_blobs(root: Path) -> None:
    linked = {p.resolve().name for p in (root / "snapshots").rglob("*") if p.is_symlink() and not p.resolve().is_dir()}
    for blob in (root / "blobs").glob("*") if (root / "blobs").is_dir() else []:
        if blob.name not in linked:
            blob.unlink()


def _remove_path(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a whole folder."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
