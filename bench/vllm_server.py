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


def command(
    model_dir: Path, served_name: str, dtype: str, max_num_seqs: int, port: int, enforce_eager: bool
) -> list[str]:
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
        *(["--enforce-eager"] if enforce_eager else []),
        "--disable-log-stats",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def server_eager(env: dict[str, str]) -> bool:
    """Whether this server's vLLM path runs eager with `env` (ENFORCE_EAGER, else the device's default)."""
    import torch

    from runners.vllm import eager
    from settings import Settings

    value = env.get("ENFORCE_EAGER", os.environ.get("ENFORCE_EAGER"))
    settings = Settings() if value is None else Settings(enforce_eager=value)
    return eager("cuda" if torch.cuda.is_available() else "cpu", settings)


@contextmanager
def vllm_own_server(
    model_dir: Path, served_name: str, dtype: str, max_num_seqs: int, env: dict[str, str], log: Path
) -> Iterator[str]:
    """A healthy vLLM OpenAI server, compiled or eager as this server's vLLM path would run with
    `env`; yields its base URL and stops it afterwards."""
    enforce_eager = server_eager(env)
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command(model_dir, served_name, dtype, max_num_seqs, port, enforce_eager),
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            # A session of its own, as BentoML starts its worker: with the kernel's autogroup
            # scheduling, CPU is shared between sessions first, so a server sharing the load
            # generator's session would get less of the machine than ours.
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=600)  # the engine loads before /health answers
        yield url
    finally:
        stop_server(proc)
