"""The environment every benchmark server runs in: a private HF cache and data folder under `root`,
no hub (models are installed, never pulled), room for every stream, models kept loaded."""

from __future__ import annotations

from pathlib import Path


def bench_server_env(root: Path, max_batch_size: int, **extra: str) -> dict[str, str]:
    return {
        "HF_HOME": str(root / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: a pull would fail, never download
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
        "MAX_BATCH_SIZE": str(max_batch_size),
        "MAX_QUEUE": "256",
        "KEEP_ALIVE": "-1",
        **extra,
    }
