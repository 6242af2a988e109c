"""The environment of an in-process server on a real socket (tests/test_vllm.py:in_process_server):
its models in a private HF cache, and every folder the server and vLLM write to inside `root`."""

from __future__ import annotations

from pathlib import Path

from .tiny_models import install_into_hf_cache

UNREACHABLE_HUB = "http://127.0.0.1:9"  # as tests/conftest.py: models never come from the network


def in_process_env(root: Path, models: dict[str, Path], backend: str, **extra: str) -> dict[str, str]:
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
