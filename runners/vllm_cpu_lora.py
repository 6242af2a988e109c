"""A fix vLLM's CPU LoRA path needs, applied inside vLLM's worker process.

vLLM 0.32's CPU LoRA ops (`vllm.lora.ops.torch_ops.lora_ops`, used by `PunicaWrapperCPU`) pick each
token's adapter weights with `weights[lora_indices]`. A token of a request without an adapter has
index -1, which in torch selects the *last* adapter slot: once all MAX_LORAS slots hold adapters,
requests for the base model in the same batch are computed with the last slot's adapter applied.
(vLLM's GPU kernels skip index -1.) tests/test_lora.py shows it: the base's output changed.

vLLM imports `NoAdapterRowsFix` in its worker (engine argument `worker_extension_cls`), which
imports this module there: it wraps the ops so rows with index -1 get no adapter contribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu

QUALNAME = f"{__name__}.NoAdapterRowsFix"


def _skip_rows_without_adapter(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def wrapped(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        none = indices < 0
        if indices.shape[0] != output.shape[0] or not bool(none.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[none].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[none] = kept
        return result

    wrapped.skips_rows_without_adapter = True  # type: ignore[attr-defined]
    return wrapped


for _name in ("bgmv_expand", "bgmv_shrink", "bgmv_expand_slice"):
    _op = getattr(lora_ops, _name)
    if not getattr(_op, "skips_rows_without_adapter", False):
        _fixed = _skip_rows_without_adapter(_op)
        setattr(lora_ops, _name, _fixed)  # the sgmv_* ops (prefill) call these through the module
        if hasattr(punica_cpu, _name):
            setattr(punica_cpu, _name, _fixed)


class NoAdapterRowsFix:
    """Nothing of its own: naming it as vLLM's worker extension imports the fix above in the worker."""
