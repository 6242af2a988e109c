"""The quantization policy, decided in one place: what precision a model loads in, and why."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

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


def decide_precision(
    requested: QuantizeRequest,
    *,
    weight_bytes: int,
    threshold_bytes: int,
    device: str,
    config: dict,
    bnb_available: bool,
    bf16_supported: bool = True,
) -> Precision:
    """Pick the precision for a load.

    `auto` goes 4-bit (bitsandbytes nf4) above the size threshold when bitsandbytes can run;
    `q4` forces it (an error if bitsandbytes is missing); `fp16`/`no` keep full precision, which
    is bf16/fp16 on CUDA and float32 on CPU, where half precision is slow or unsupported.
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
        full = _full_precision(device, bf16_supported)
        return Precision(full.mode, f"weights exceed the q4 threshold but bitsandbytes is unavailable; {full.reason}")
    return _full_precision(device, bf16_supported, half=requested == "fp16")


def _full_precision(device: str, bf16_supported: bool, half: bool = False) -> Precision:
    if device != "cuda":
        return Precision("fp32", "full precision on CPU (float32)")
    if half or not bf16_supported:
        return Precision("fp16", "full precision on CUDA (float16)")
    return Precision("bf16", "full precision on CUDA (bfloat16)")
