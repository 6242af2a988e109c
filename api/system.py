"""Operational endpoints: /status, /health, /diag."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from fastapi import APIRouter, Depends

from api.deps import get_runtime
from runners.backend import vllm_available
from runners.quantization import bitsandbytes_available
from runtime import Runtime

router = APIRouter(tags=["system"])


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@router.get("/status")
async def status(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    pool = runtime.pool
    loaded = pool.snapshot()
    return {
        "replica": runtime.jobs.owner,  # host/pid/id: which replica answered
        "vllm_available": vllm_available(),
        "transformers_available": _installed("transformers"),
        "bitsandbytes_available": bitsandbytes_available(),
        "hf_hub_available": _installed("huggingface_hub"),
        "device": pool.device,
        "cache_size": len(loaded),
        "max_cache": runtime.settings.max_cache_models,
        "cached_models": [e.name for e in loaded],
        "loaded_models": [
            {
                "model": e.name,
                "purpose": e.purpose,  # "embed": the transformers runner embedding for a model generating on vLLM
                "backend": e.backend,
                "backend_reason": e.backend_reason,
                "quantization": e.precision,
                "tool_call_parser": e.parsers.tool_parser,
                "reasoning_parser": e.parsers.reasoning_parser,
                "parsers_reason": e.parsers.reason,
                "memory_bytes": e.memory_bytes,
                "adapters": [a.ref.name for a in e.adapters],  # LoRA adapters served over this model (its base)
                "active_requests": e.leases,
                "running_requests": e.running,  # decoding in the current batch
                "waiting_requests": e.waiting,  # queued for a batch slot
                "expires_at": e.expires_at,
            }
            for e in loaded
        ],
        "memory_in_use_bytes": pool.memory_in_use(),
        "failed_loads": pool.failed_loads(),
        "preload": runtime.preload_status(),  # PRELOAD_MODELS: loaded at startup, or why not
        "config": runtime.settings.public(),
    }


@router.get("/health")
async def health(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    import torch

    gpu: dict[str, Any] = {"gpu_status": "unavailable", "gpu_memory_allocated_mb": 0.0, "gpu_memory_reserved_mb": 0.0}
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            gpu = {
                "gpu_status": "available",
                "gpu_memory_allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
                "gpu_memory_reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1),
            }
        except RuntimeError:
            gpu["gpu_status"] = "error"
    backends = _installed("transformers") or vllm_available()
    return {
        "status": "healthy" if backends else "degraded",
        "uptime_seconds": round(time.time() - runtime.started_at, 1),
        "models_cached": len(runtime.pool.snapshot()),
        "cache_limit": runtime.settings.max_cache_models,
        "downloads_active": runtime.jobs.downloads_active,
        "downloads_queued": runtime.jobs.downloads_queued,
        "torch_version": torch.__version__,
        "cuda_available": cuda,
        **gpu,
    }


@router.get("/diag")
async def diag() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {
            "torch_installed": False,
            "torch_version": None,
            "cuda_available": False,
            "cuda_count": 0,
            "cuda_devices": [],
        }
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    return {
        "torch_installed": True,
        "torch_version": torch.__version__,
        "cuda_available": cuda,
        "cuda_count": count,
        "cuda_devices": [{"index": i, "name": torch.cuda.get_device_name(i)} for i in range(count)],
    }
