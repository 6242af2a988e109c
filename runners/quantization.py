"""The quantization policy, decided in one place: what precision a model loads in, and why."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from errors import InvalidRequest

QuantizeRequest = Literal["auto", "q4", "fp16", "no"]
Mode = Literal["nf4", "bf16", "fp16", "fp32", "prequantized"]


@dataclass(frozen=True)
class Precision:
    mode: Mode
    reason: str

    @property
    def quantized(self) -> bool:
        return self.mode in ("nf4", "prequantized")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# CPU features that make bfloat16 arithmetic native: x86 flags in /proc/cpuinfo (AVX512-BF16 on
# Cooper Lake, Zen 4 and later; AMX on Sapphire Rapids and later), and aarch64's BF16 extension.
# Without one, torch and vLLM emulate bf16 by converting to float32, which is slower than float32.
_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")


def bf16_cpu_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU feature that makes bf16 native here (e.g. "avx512_bf16"), or None. `cpuinfo` is the
    text of /proc/cpuinfo (read when not given; no file, e.g. off Linux, means no known support)."""
    if cpuinfo is None:
        return _host_bf16_cpu_feature()
    features: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            features.update(value.split())
    return next((f for f in _BF16_CPU_FEATURES if f in features), None)


@functools.cache
def _host_bf16_cpu_feature() -> str | None:
    try:
        return bf16_cpu_feature(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def checkpoint_dtype(config: dict[str, Any]) -> str:
    """The dtype the checkpoint's weights are stored in, per its config (float32 when unstated,
    which is also what transformers assumes)."""
    text = config.get("text_config") or {}
    return str(
        config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
    )


def decide_precision(
    requested: QuantizeRequest,
    *,
    weight_bytes: int,
    threshold_bytes: int,
    device: str,
    config: dict,
    bnb_available: bool,
    bf16_supported: bool = True,
    cpu_bf16: str | None = None,
) -> Precision:
    """Pick the precision for a load.

    `auto` goes 4-bit (bitsandbytes nf4) above the size threshold when bitsandbytes can run;
    `q4` forces it (an error if bitsandbytes is missing); `fp16`/`no` keep full precision:
    - CUDA: bf16 (fp16 where bf16 is unsupported or `fp16` was asked for);
    - CPU with native bf16 (`cpu_bf16` names the feature, see `bf16_cpu_feature`): a bf16 or fp16
      checkpoint computes in bf16 (the CPU's native half format: fp16 keeps its range there, and
      half the bytes per decode step of float32); a float32 checkpoint stays float32 unless `fp16`
      asks for half precision;
    - CPU without it: float32, where emulated half precision would be slower.
    """
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "unknown")
        return Precision("prequantized", f"checkpoint is already quantized ({method})")
    if requested == "q4":
        if not bnb_available:
            raise InvalidRequest("quantize 'q4' needs bitsandbytes, which is not installed", param="quantize")
        return Precision("nf4", "4-bit requested (q4)")
    if requested == "auto" and weight_bytes > threshold_bytes:
        if bnb_available:
            return Precision("nf4", f"weights ({weight_bytes} B) exceed MODEL_Q4_THRESHOLD_BYTES ({threshold_bytes} B)")
        full = _full_precision(device, bf16_supported, cpu_bf16, checkpoint_dtype(config))
        return Precision(full.mode, f"weights exceed the q4 threshold but bitsandbytes is unavailable; {full.reason}")
    return _full_precision(device, bf16_supported, cpu_bf16, checkpoint_dtype(config), half=requested == "fp16")


def _full_precision(
    device: str, bf16_supported: bool, cpu_bf16: str | None, stored: str, half: bool = False
) -> Precision:
    if device != "cuda":
        return _cpu_precision(cpu_bf16, stored, half)
    if half or not bf16_supported:
        return Precision("fp16", "full precision on CUDA (float16)")
    return Precision("bf16", "full precision on CUDA (bfloat16)")


def _cpu_precision(cpu_bf16: str | None, stored: str, half: bool) -> Precision:
    if cpu_bf16 is None:
        return Precision("fp32", "float32 on CPU: this CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag)")
    if stored == "bfloat16":
        return Precision("bf16", f"the checkpoint's bfloat16 on CPU: native here ({cpu_bf16})")
    if stored == "float16":
        return Precision("bf16", f"float16 checkpoint in bfloat16 on CPU: the half format native here ({cpu_bf16})")
    if half:
        return Precision("bf16", f"half precision asked (fp16): bfloat16 on CPU, native here ({cpu_bf16})")
    return Precision("fp32", f"the checkpoint's {stored} on CPU (quantize 'fp16' would use bf16, native here)")
