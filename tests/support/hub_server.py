"""A local, Hugging-Face-Hub-compatible HTTP server for tests (stdlib only).

It serves the repos under `root/org/name/` (plain files) with the routes huggingface_hub 2.x and
transformers call: model info, tree listing, paths-info and `resolve` (HEAD/GET with Range). Errors carry
the Hub's `X-Error-Code` header so the client raises its usual exceptions. Commits and blob ids are
derived from file content (see `repo_files`), so `install_into_hf_cache` agrees with it.

    with LocalHub(tmp_path / "hub") as hub:
        hub.add_repo("org/tiny", model_dir)
        snapshot_download("org/tiny", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .repo_files import RepoEntry, commit_hash, scan_repo

LAST_MODIFIED = "2026-01-01T00:00:00.000Z"
CHUNK = 64 * 1024
EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}


@dataclass(frozen=True)
class HubRequest:
    """One request the hub received."""

    method: str
    path: str  # URL path, query string excluded
    headers: Message  # case-insensitive `.get()`


@dataclass(frozen=True)
class _Snapshot:
    commit: str
    files: dict[str, RepoEntry]


class HubError(Exception):
    """An error answer: status, the Hub's X-Error-Code, and a message."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class LocalHub:
    """Serves `root/org/name/` repos over HTTP on 127.0.0.1, in a daemon thread.

    Knobs (may be changed while running):
    - `throttle_bytes_per_sec`: cap on each file download's speed.
    - `fail_after_bytes`: the first GET of each file is cut after this many bytes (the connection closes
      mid-body); later GETs of that file complete, so a client that resumes or retries succeeds.
    - `gated`: repo ids answered with 403 `GatedRepo`.
    `requests` records every request received; `peak_downloads` the most GETs of one file
    (`"org/name/path"`) that were sending at the same time (several clients downloading it at once).
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int = 0,
        throttle_bytes_per_sec: float | None = None,
        fail_after_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.throttle_bytes_per_sec = throttle_bytes_per_sec
        self.fail_after_bytes = fail_after_bytes
        self.gated: set[str] = set()
        self.requests: list[HubRequest] = []
        self.peak_downloads: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._cut_files: set[Path] = set()
        self._lock = threading.Lock()
        self._snapshots: dict[str, tuple[tuple, _Snapshot]] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321` (valid once started)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Bind (a free port the first time, the same port on a restart), serve, return the endpoint."""
        if self._server is not None:
            raise RuntimeError("LocalHub already running")
        self._stopping.clear()
        server = _Server(self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="LocalHub", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and cut every open connection, including downloads in progress."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repos -------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, src_dir: Path) -> str:
        """Copy a folder in as repo `repo_id` (replacing any previous content); returns its commit hash."""
        dst = self._repo_dir(repo_id)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src_dir, dst)
        return self.commit(repo_id)

    def commit(self, repo_id: str) -> str:
        """The commit hash the hub reports for `repo_id` now."""
        return self._snapshot(repo_id).commit

    def _repo_dir(self, repo_id: str) -> Path:
        org, _, name = repo_id.partition("/")
        if not org or not name or "/" in name or ".." in (org, name):
            raise ValueError(f"repo ids here are 'org/name', got {repo_id!r}")
        return self.root / org / name

    def _snapshot(self, repo_id: str) -> _Snapshot:
        """Current files and commit of a repo, rehashed only when a file's size or mtime changed."""
        repo_dir = self._repo_dir(repo_id)
        if not repo_dir.is_dir():
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        stamp = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in repo_dir.rglob("*")))
        cached = self._snapshots.get(repo_id)
        if cached is None or cached[0] != stamp:
            entries = scan_repo(repo_dir)
            cached = (stamp, _Snapshot(commit_hash(entries), {e.path: e for e in entries}))
            self._snapshots[repo_id] = cached
        return cached[1]

    def _resolve(self, repo_id: str, revision: str) -> _Snapshot:
        """The snapshot at `revision` ("main" or the current commit), or the Hub's error."""
        snap = self._snapshot(repo_id)
        if repo_id in self.gated:
            raise HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted")
        if revision not in ("main", snap.commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return snap


# -- JSON payloads -----------------------------------------------------------------------------------
def _file_info(entry: RepoEntry) -> dict:
    info: dict = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
    if entry.sha256:
        info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return info


def _dir_info(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0, "path": path}


def _model_info(repo_id: str, snap: _Snapshot, repo_dir: Path) -> dict:
    config_file = repo_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    siblings = []
    for e in snap.files.values():
        sibling: dict = {"rfilename": e.path, "size": e.size, "blobId": e.git_oid}
        if e.sha256:
            sibling["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        siblings.append(sibling)
    return {
        "_id": snap.commit[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0],
        "sha": snap.commit,
        "lastModified": LAST_MODIFIED,
        "createdAt": LAST_MODIFIED,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["transformers", "safetensors", config.get("model_type", "custom"), "text-generation"],
        "config": {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config},
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(e.size for e in snap.files.values()),
    }


def _tree(snap: _Snapshot, path: str, recursive: bool) -> list[dict]:
    """Folders and files under folder `path` ("" for the root): all of them, or only its children."""
    prefix = f"{path}/" if path else ""
    below = [e for p, e in snap.files.items() if p.startswith(prefix)]
    if path and not below:
        raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision", snap.commit)
    listing: dict[str, dict] = {}
    for e in below:
        parts = e.path[len(prefix) :].split("/")
        folders = [prefix + "/".join(parts[:i]) for i in range(1, len(parts))]
        if recursive:
            listing |= {d: _dir_info(d) for d in folders}
            listing[e.path] = _file_info(e)
        elif folders:
            listing[folders[0]] = _dir_info(folders[0])
        else:
            listing[e.path] = _file_info(e)
    return list(listing.values())


def _paths_info(snap: _Snapshot, paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        path = path.strip("/")
        if path in snap.files:
            out.append(_file_info(snap.files[path]))
        elif any(p.startswith(f"{path}/") for p in snap.files):
            out.append(_dir_info(path))
    return out


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single `bytes=` range; None for no header; HubError 416 if unsatisfiable."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first, _, last = spec.partition("-")
    try:
        if unit.strip() != "bytes" or "," in spec:
            raise ValueError(header)
        if first:
            start, end = int(first), int(last) if last else size - 1
        else:
            start, end = size - int(last), size - 1
    except ValueError:
        raise HubError(416, None, f"Bad Range header {header!r}") from None
    if start < 0 or start >= size or end < start:
        raise HubError(416, None, f"Range {header!r} not satisfiable for {size} bytes")
    return start, min(end, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", hub.port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet about connections cut by either side; report anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    server: _Server

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr log; `LocalHub.requests` records requests."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # -- routing -------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(HubRequest(self.command, url.path, self.headers))
        body = self._read_body()
        seg = url.path.strip("/").split("/")
        try:
            if url.path == "/api/agent-harnesses":  # huggingface_hub's agent detection, once a day per HF_HOME
                self._send_json(EMPTY_AGENT_REGISTRY)
            elif seg[:2] == ["api", "models"] and len(seg) >= 4:
                self._api(f"{unquote(seg[2])}/{unquote(seg[3])}", seg[4:], parse_qs(url.query), body)
            elif len(seg) >= 5 and seg[2] == "resolve" and self.command in ("GET", "HEAD"):
                path = "/".join(unquote(s) for s in seg[4:])
                self._resolve_file(f"{unquote(seg[0])}/{unquote(seg[1])}", unquote(seg[3]), path)
            else:
                raise HubError(404, None, f"No route for {self.command} {url.path}")
        except HubError as e:
            self._send_error(e)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
        self._check_repo_id(repo_id)
        method, route = self.command, rest[0] if rest else ""
        if method == "GET" and (not rest or (route == "revision" and len(rest) == 2)):
            snap = self.hub._resolve(repo_id, unquote(rest[1]) if rest else "main")
            self._send_json(_model_info(repo_id, snap, self.hub._repo_dir(repo_id)), snap.commit)
        elif method == "GET" and route == "tree" and len(rest) >= 2:
            snap = self.hub._resolve(repo_id, unquote(rest[1]))
            path = "/".join(unquote(s) for s in rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            self._send_json(_tree(snap, path, recursive), snap.commit)
        elif method == "POST" and route == "paths-info" and len(rest) == 2:
            snap = self.hub._resolve(repo_id, unquote(rest[1]))
            self._send_json(_paths_info(snap, self._form_or_json_paths(body)), snap.commit)
        else:
            raise HubError(404, None, f"No route for {method} {self.path}")

    def _check_repo_id(self, repo_id: str) -> None:
        try:
            self.hub._repo_dir(repo_id)
        except ValueError as e:
            raise HubError(404, "RepoNotFound", str(e)) from None

    def _form_or_json_paths(self, body: bytes) -> list[str]:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return list(json.loads(body or b"{}").get("paths", []))
        return parse_qs(body.decode()).get("paths", [])

    # -- files ---------------------------------------------------------------------------------------
    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        self._check_repo_id(repo_id)
        snap = self.hub._resolve(repo_id, revision)
        entry = snap.files.get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", snap.commit)
        byte_range = _parse_range(self.headers.get("Range"), entry.size)
        start, end = byte_range or (0, entry.size - 1)
        self.send_response(206 if byte_range else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", snap.commit)
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("Last-Modified", formatdate(usegmt=True))
        if entry.sha256:
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        if byte_range:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if self.command == "GET":
            key = f"{repo_id}/{path}"
            self._count_download(key, +1)
            try:
                self._send_file(entry.file, start, end - start + 1, self._cut_at(entry.file))
            finally:
                self._count_download(key, -1)

    def _count_download(self, key: str, change: int) -> None:
        hub = self.hub
        with hub._lock:
            hub._in_flight[key] = hub._in_flight.get(key, 0) + change
            hub.peak_downloads[key] = max(hub.peak_downloads.get(key, 0), hub._in_flight[key])

    def _cut_at(self, file: Path) -> int | None:
        """Bytes after which to cut this response: `fail_after_bytes` on a file's first GET, else None."""
        hub = self.hub
        with hub._lock:
            if hub.fail_after_bytes is None or file in hub._cut_files:
                return None
            hub._cut_files.add(file)
        return hub.fail_after_bytes

    def _send_file(self, file: Path, start: int, length: int, cut_at: int | None) -> None:
        """Write `length` bytes from `start`, throttled, cut short after `cut_at` bytes or by `stop()`."""
        hub = self.hub
        limit = length if cut_at is None else min(cut_at, length)
        began, sent = time.monotonic(), 0
        with file.open("rb") as f:
            f.seek(start)
            while sent < limit and not hub._stopping.is_set():
                rate = hub.throttle_bytes_per_sec
                chunk_size = min(CHUNK, limit - sent, max(1024, int(rate / 20)) if rate else CHUNK)
                chunk = f.read(chunk_size)
                self.wfile.write(chunk)
                sent += len(chunk)
                if rate:
                    time.sleep(max(0.0, sent / rate - (time.monotonic() - began)))
        if sent < length:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- answers -------------------------------------------------------------------------------------
    def _send_json(self, payload: object, commit: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, err: HubError) -> None:
        data = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Message", err.message)
        if err.code:
            self.send_header("X-Error-Code", err.code)
        if err.commit:
            self.send_header("X-Repo-Commit", err.commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
