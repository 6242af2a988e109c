"""The one way tests start the real server, in two modes.

- In process: the BentoML service's own ASGI app (`service_asgi_app`), started by the `serve`
  fixture (tests/support/fixtures.py) under a TestClient, or by `in_process_server` under uvicorn
  on a real socket; either way the Runtime is in reach (`current_runtime`).
- A subprocess: `bentoml serve` on a free loopback port (`running_server`, or `start_server` +
  `wait_healthy` + `stop_server` / `kill_server` for tests that restart or kill it).

Models never come from the network: UNREACHABLE_HUB is the Hub of every server unless a test starts
a LocalHub (tests/support/hub_server.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from .tiny_models import install_into_hf_cache

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE_HUB = "http://127.0.0.1:9"  # a closed loopback port: chat must never reach the network


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- in process ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def service_asgi_app() -> Any:
    """The BentoML service's ASGI app, built once: BentoML registers process-wide Prometheus
    metrics when it builds the app. Each start still runs the lifespan, which creates a fresh
    service instance (and Runtime, reading the environment) each time."""
    from service import AIServer

    return AIServer.to_asgi()


def current_runtime() -> Any:
    """The in-process server's Runtime, for tests that check real memory release."""
    from service import app

    return app.state.runtime


def in_process_env(root: Path, models: dict[str, Path], backend: str, **extra: str) -> dict[str, str]:
    """The environment of `in_process_server`: its models in a private HF cache, and every folder
    the server and vLLM write to inside `root`."""
    for repo_id, model_dir in models.items():
        install_into_hf_cache(model_dir, root / "hf" / "hub", repo_id)
    (root / "rpc").mkdir(exist_ok=True)
    return {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BACKEND": backend,
        "VLLM_CACHE_ROOT": str(root / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "VLLM_RPC_BASE_PATH": str(root / "rpc"),
        "VLLM_LOGGING_LEVEL": "WARNING",
        **extra,
    }


@contextmanager
def in_process_server(env: dict[str, str]) -> Iterator[str]:
    """The service's own ASGI app under uvicorn in a thread: a real socket, the Runtime in reach."""
    import pytest  # here, not at the top: bench/ imports this module without pytest installed
    import uvicorn

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(service_asgi_app(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="test-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=120)


# -- a subprocess ----------------------------------------------------------------------------------


BENTOML_SERVE = (sys.executable, "-m", "bentoml", "serve", "service:AIServer")


def start_server(env: dict[str, str], port: int, log: Path, command: Sequence[str] = BENTOML_SERVE) -> subprocess.Popen:
    """`command` (by default `bentoml serve`; `ai-server serve` takes the same options) on `port`.
    Output goes to `log` (a pipe nobody reads would stall a server that logs a lot)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Return once `url` answers /health; fail with the log's tail if the server exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become healthy")


@contextmanager
def running_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """A healthy `bentoml serve` with `env`; yields its base URL and stops it afterwards."""
    port = free_port()
    proc = start_server(env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop gracefully; failing that, kill the whole tree (BentoML's workers run in sessions of
    their own, so killing the supervisor alone would leave them running)."""
    import psutil

    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        proc.wait(timeout=10)


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the supervisor and its workers (which BentoML starts in sessions of their own)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)
    proc.wait()


def process_tree_pids(proc: subprocess.Popen) -> set[int]:
    """The server's process and its descendants (the worker that owns jobs among them)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return {proc.pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()
