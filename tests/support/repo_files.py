"""Hub-style identities of the files in a local repo folder (git blob ids, LFS sha256, commit hash).

Shared by the local Hub server and the cache installer, so a repo installed into a cache and the same
repo served by `LocalHub` have the same commit hash and blob names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

LFS_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".model"})
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files over 10 MB in LFS whatever their name


@dataclass(frozen=True)
class RepoEntry:
    """One file of a repo, with the identifiers the Hub reports for it."""

    path: str  # posix path inside the repo
    file: Path
    size: int
    git_oid: str  # git blob sha1 of what git stores: the file, or its LFS pointer
    sha256: str | None  # set for LFS files only
    pointer_size: int | None

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives the blob in its cache: sha256 for LFS files, else the git oid."""
        return self.sha256 or self.git_oid


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would store this file in LFS."""
    return Path(path).suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE


def describe_file(repo_dir: Path, file: Path) -> RepoEntry:
    """Hash one file of `repo_dir` the way the Hub identifies it."""
    data = file.read_bytes()
    path = file.relative_to(repo_dir).as_posix()
    if not is_lfs(path, len(data)):
        return RepoEntry(path, file, len(data), _git_blob_oid(data), None, None)
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = _lfs_pointer(sha256, len(data))
    return RepoEntry(path, file, len(data), _git_blob_oid(pointer), sha256, len(pointer))


def scan_repo(repo_dir: Path) -> list[RepoEntry]:
    """All files of a repo folder (hidden files and folders skipped), sorted by path."""
    files = (
        f
        for f in repo_dir.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(repo_dir).parts)
    )
    return sorted((describe_file(repo_dir, f) for f in files), key=lambda e: e.path)


def commit_hash(entries: list[RepoEntry]) -> str:
    """A stable 40-hex commit id derived from the repo content."""
    digest = hashlib.sha1()
    for entry in entries:
        digest.update(f"{entry.path}\0{entry.git_oid}\n".encode())
    return digest.hexdigest()
