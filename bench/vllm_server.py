"""vLLM's own OpenAI server as a baseline: the same engine and engine settings as this server's
vLLM path, behind vLLM's HTTP front end instead of ours."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.server_process import free_port, stop_server, wait_healthy


def command(model_dir: Path, served_name: str, dtype: str, max_num_seqs: int, port: int) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` with the engine arguments runners/vllm.py uses on CPU."""
    from runners.vllm import CPU_KV_CACHE_BYTES

    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(max_num_seqs),
        "--kv-cache-memory-bytes",
        str(CPU_KV_CACHE_BYTES),
        "--enforce-eager",
        "--disable-log-stats",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextmanager
def vllm_own_server(
    model_dir: Path, served_name: str, dtype: str, max_num_seqs: int, env: dict[str, str], log: Path
) -> Iterator[str]:
    """A healthy vLLM OpenAI server; yields its base URL and stops it afterwards."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command(model_dir, served_name, dtype, max_num_seqs, port),
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=600)  # the engine loads before /health answers
        yield url
    finally:
        stop_server(proc)
