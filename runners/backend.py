"""Which engine runs a model, decided in one place, with the reason kept for /models and /status.

vLLM is preferred wherever it can run the model; transformers runs everything else. vLLM is asked
itself (its platform, model registry, quantization methods and CPU attention kernels), never a
list of ours, so the answer follows the installed version.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

from errors import ModelLoadFailed
from runners.base import Runner
from runners.local_cache import LocalModel
from runners.model_info import is_vision_model
from runners.quantization import Precision
from settings import Settings

BackendName = Literal["vllm", "transformers"]


@dataclass(frozen=True)
class BackendChoice:
    name: BackendName
    reason: str


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(setting: str, *, device: str, config: dict[str, Any], precision: Precision) -> BackendChoice:
    """The engine for a model with this `config.json` at this precision on `device` (blocking:
    the first call imports vLLM). BACKEND=vllm raises ModelLoadFailed when vLLM cannot serve it."""
    if setting == "transformers":
        return BackendChoice("transformers", "BACKEND=transformers")
    obstacle = vllm_obstacle(device, config, precision)
    if obstacle is None:
        archs = ", ".join(config.get("architectures") or [])
        return BackendChoice("vllm", f"BACKEND={setting}: vLLM supports {archs} on {device}")
    if setting == "vllm":
        raise ModelLoadFailed(
            f"BACKEND=vllm, but vLLM cannot serve this model: {obstacle} (BACKEND=auto falls back to transformers)"
        )
    return BackendChoice("transformers", f"{obstacle}: using transformers")


# Why vision models run on transformers, on every device: vLLM's CPU build cannot import its
# vision models (they import torchvision, which cannot load beside CPU torch; shared/DESIGN.md), and
# this server does not yet hand images to vLLM's multimodal inputs, which only a GPU build could test.
VISION_OBSTACLE = (
    "a vision model: images are served by transformers (vLLM's CPU build cannot import its "
    "vision models, which need torchvision; vLLM's multimodal inputs are not wired here)"
)


def vllm_obstacle(device: str, config: dict[str, Any], precision: Precision) -> str | None:
    """Why vLLM cannot run this model here, or None when it can."""
    if is_vision_model(config):
        return VISION_OBSTACLE
    if not vllm_available():
        return "vLLM is not installed"
    try:
        import vllm
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
        from vllm.model_executor.models import ModelRegistry
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"vLLM is installed but cannot be imported ({exc})"
    if current_platform.device_type != device:
        return (
            f"the installed vLLM build runs on {current_platform.device_type or 'no device it supports'}, not {device}"
        )
    archs = config.get("architectures") or []
    if not any(arch in ModelRegistry.get_supported_archs() for arch in archs):
        return f"architecture {', '.join(archs) or '(none named)'} is not supported by vLLM"
    if precision.mode == "nf4" and not (device == "cuda" and "bitsandbytes" in QUANTIZATION_METHODS):
        return f"vLLM {vllm.__version__} on {device.upper()} cannot run bitsandbytes 4-bit"
    if precision.mode == "prequantized":
        method = str((config.get("quantization_config") or {}).get("quant_method"))
        if method not in QUANTIZATION_METHODS:
            return f"vLLM {vllm.__version__} cannot run {method}-quantized checkpoints"
        try:
            current_platform.verify_quantization(method)
        except ValueError as exc:
            return str(exc)
    if device == "cpu":
        return _cpu_attention_obstacle(config)
    return None


def _cpu_attention_obstacle(config: dict[str, Any]) -> str | None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text = config.get("text_config") or config
    heads = text.get("num_attention_heads") or 1
    head_size = text.get("head_dim") or (text.get("hidden_size") or 0) // heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        return f"vLLM's CPU attention has no kernel for head size {head_size} (it supports {supported})"
    return None


def load_runner(
    choice: BackendChoice,
    model: LocalModel,
    precision: Precision,
    device: str,
    trust_remote_code: bool,
    settings: Settings,
) -> Runner:
    """Load `model` on the chosen engine (blocking)."""
    if choice.name == "vllm":
        from runners.vllm import VllmRunner

        return VllmRunner.load(model, precision, device, trust_remote_code, settings)
    from runners.transformers import TransformersRunner

    return TransformersRunner.load(
        model,
        precision,
        device,
        trust_remote_code,
        max_batch_size=settings.max_batch_size,
        gpus=settings.tensor_parallel_size,
        cpu_threads=settings.cpu_threads,
    )
