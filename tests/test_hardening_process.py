"""Hardening against the real `bentoml serve`: a 50 MB prompt, and a supervisor killed with -9."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.server_process import UNREACHABLE_HUB, free_port, start_server, stop_server, wait_healthy
from tests.support.tiny_models import install_into_hf_cache

MODEL = "test-org/tiny-llama"
FIFTY_MB = 50 * 2**20


def _env(root: Path) -> dict[str, str]:
    return {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
        "BACKEND": "transformers",
    }


def _worker(supervisor_pid: int) -> psutil.Process:
    [worker] = [
        p
        for p in psutil.Process(supervisor_pid).children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    ]
    return worker


class PeakRss:
    """The highest RSS `process` reaches while the block runs (sampled every 20 ms)."""

    def __init__(self, process: psutil.Process) -> None:
        self.process, self.peak, self._done = process, process.memory_info().rss, threading.Event()

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[tuple[str, psutil.Process]]:
    root = tmp_path_factory.mktemp("hardening")
    install_into_hf_cache(tiny_llama_dir, root / "hf" / "hub", MODEL)
    port, log = free_port(), root / "server.log"
    supervisor = start_server(_env(root), port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", supervisor, log)
        yield f"http://127.0.0.1:{port}", _worker(supervisor.pid)
    finally:
        stop_server(supervisor)


def _huge_chunks() -> Iterator[bytes]:
    yield b'{"model": "test-org/tiny-llama", "prompt": "'
    for _ in range(FIFTY_MB // 2**20):
        yield b"a" * 2**20
    yield b'", "stream": false}'


def test_a_50_mb_prompt_is_refused_without_the_worker_growing(server: tuple[str, psutil.Process]) -> None:
    url, worker = server
    assert (
        httpx.post(
            f"{url}/api/generate",
            json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
            timeout=60,
        ).status_code
        == 200
    )
    before = worker.memory_info().rss
    with PeakRss(worker) as rss:
        declared = httpx.post(f"{url}/api/generate", json={"model": MODEL, "prompt": "a" * FIFTY_MB}, timeout=60)
        chunked = httpx.post(
            f"{url}/v1/completions", content=_huge_chunks(), timeout=60, headers={"content-type": "application/json"}
        )
    assert declared.status_code == 413 and "MAX_REQUEST_BYTES" in declared.json()["error"]
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    # Holding the body alone would add 50 MB; tokenizing it added gigabytes.
    assert rss.peak - before < 30 * 2**20, f"worker grew by {(rss.peak - before) / 2**20:.0f} MiB"
    assert httpx.get(f"{url}/api/ps", timeout=10).status_code == 200


def test_the_worker_exits_when_its_supervisor_is_killed(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """kill -9 of `bentoml serve`: its worker (in a session of its own) must not keep the port, so
    a new server on the same port comes up."""
    install_into_hf_cache(tiny_llama_dir, tmp_path / "hf" / "hub", MODEL)
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    first = start_server(_env(tmp_path), port, log)
    try:
        wait_healthy(url, first, log)
        worker = _worker(first.pid)
        first.kill()
        first.wait(10)
        gone, _ = psutil.wait_procs([worker], timeout=60)
        assert gone, "the worker outlived its supervisor"
    finally:
        if first.poll() is None:
            stop_server(first)
    second = start_server(_env(tmp_path), port, log)
    try:
        wait_healthy(url, second, log)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        stop_server(second)
