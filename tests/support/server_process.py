"""Running the real server: `bentoml serve` in a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """Output goes to `log` (a pipe nobody reads would stall a server that logs a lot)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:AIServer", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
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
