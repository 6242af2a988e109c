"""Which engine runs a model, decided in one place, with the reason kept for /models and /status."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from errors import ModelLoadFailed
from runners.base import Runner
from runners.local_cache import LocalModel
from runners.quantization import Precision

BackendName = Literal["vllm", "transformers"]


@dataclass(frozen=True)
class BackendChoice:
    name: BackendName
    reason: str


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(setting: str) -> BackendChoice:
    """BACKEND=transformers always works; vllm needs the vLLM engine installed."""
    if setting == "transformers":
        return BackendChoice("transformers", "BACKEND=transformers")
    if not vllm_available():
        if setting == "vllm":
            raise ModelLoadFailed("BACKEND=vllm, but vLLM is not installed (pip install '.[vllm]')")
        return BackendChoice("transformers", "vLLM is not installed")
    if setting == "vllm":
        raise ModelLoadFailed("BACKEND=vllm, but this build has no vLLM runner yet")
    return BackendChoice("transformers", "vLLM runner not built into this version")


def load_runner(
    choice: BackendChoice, model: LocalModel, precision: Precision, device: str, trust_remote_code: bool
) -> Runner:
    """Load `model` on the chosen engine (blocking)."""
    from runners.transformers import TransformersRunner

    return TransformersRunner.load(model, precision, device, trust_remote_code)
