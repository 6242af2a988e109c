"""CPU fast paths for the transformers engine, applied once after a load (`apply_cpu_speedups`), and
the engine's thread count (`engine_threads`, the CPU_THREADS setting).

Measured on this project's 2-core EPYC (bf16, avx512_bf16) with the bench's 768-wide 12-layer Llama:
- **Prepacked linear weights.** `F.linear` on a bf16 CPU weight reorders the weight into oneDNN's
  blocked layout on every call; a decode step is almost nothing but such calls. Packed once at load
  (`mkldnn._reorder_linear_weight`), a 768x2048 projection at 8 rows takes 80 us instead of 140-180,
  with bit-identical results. The packed tensor replaces the weight (no second copy in memory).
  Where the C++ linear kernel applies (AVX512-BF16, one torch thread; runners/native_kernels.py),
  the weight is repacked for it instead: 1.4-2.3x faster than oneDNN's packed call at 1-16 rows.
- **Decode attention.** For one new token per row, SDPA's CPU flash kernel costs 1.3 ms per layer
  at 100 cached tokens and 4.5 ms at 400 (8 rows, one thread); two batched matmuls and a softmax in
  float32 do the same in 0.23 and 1.0 ms, as precisely. Prompts (more than one query token) still
  go to SDPA, whose flash kernel keeps a long prefill's memory bounded.
Greedy tokens are unchanged (tests/unit/test_cpu_speedups.py); `bench/decode_loop.py` measures the
whole decode loop with and without them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from runners import native_kernels

logger = logging.getLogger(__name__)

DECODE_ATTENTION = "sdpa_cpu_decode"  # the attention implementation's name in transformers' registry


def engine_threads(setting: int) -> int:
    """torch's threads for the engine (CPU_THREADS): the setting, or one per usable core less one,
    as vLLM's CPU worker leaves one core to its serving process."""
    return setting or max(1, len(os.sched_getaffinity(0)) - 1)


def apply_cpu_speedups(model: Any, batch_rows: int, native_linear: bool = True) -> list[str]:
    """Apply what fits this model (on CPU); returns the names of what was applied, for the log.
    `batch_rows` is the usual number of rows a decode step multiplies (oneDNN's packing hint);
    `native_linear=False` keeps oneDNN's packing where the C++ linear kernel would apply (a baseline)."""
    applied = []
    if _use_decode_attention(model):
        _register_decode_attention()
        model.set_attn_implementation(DECODE_ATTENTION)
        applied.append("decode attention")
        if model.dtype == torch.bfloat16 and native_kernels.load():
            applied.append("its C++ kernel")
    native = native_linear and model.dtype == torch.bfloat16 and native_linear_applies()
    packed = pack_linear_weights(model, batch_rows, native=native)
    if packed:
        applied.append(f"{packed} linear weights packed for {'the C++ kernel' if native else 'oneDNN'}")
    if applied:
        logger.info("CPU fast paths for %s: %s", type(model).__name__, ", ".join(applied))
    return applied


def _use_decode_attention(model: Any) -> bool:
    return model.device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (query [b, heads, q, d], key/value [b, kv heads,
    k, d]; returns [b, q, heads, d]). One query token on CPU: matmul, softmax in float32, matmul,
    with the query heads of one key/value head grouped instead of repeating the keys (or the C++
    kernel of runners/native_kernels.py, which does the same reading the bf16 cache as it is). Else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if length != 1 or query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = dim**-0.5 if scaling is None else scaling
    if attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1)):
        visible = None if attention_mask is None else attention_mask[:, 0, 0, :]
        output = native_kernels.decode_attention(query, key, value, visible, scale)
        if output is not None:
            return output, None
    kv_heads = key.shape[1]
    # In float32, as SDPA's kernel accumulates: bf16 scores would move near-tied tokens.
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim).float()  # head h reads kv head h // group
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:  # [b, 1, 1, k]: True (or 0) where the row may attend
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    output = torch.matmul(torch.softmax(scores, dim=-1), value.float())
    return output.to(value.dtype).reshape(batch, 1, heads, dim), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # SDPA's boolean masks, for both paths


class PackedLinear(torch.nn.Linear):
    """An nn.Linear whose weight is a oneDNN-packed bf16 tensor (only this forward can read it)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(input, self.weight, self.bias, "none", [], "")


class NativeLinear(torch.nn.Linear):
    """An nn.Linear whose bf16 weight is repacked for the C++ kernel (runners/native/linear_bf16.cpp;
    only this forward can read it). The kernel runs on the calling thread, so it is chosen at load
    only when torch runs one thread."""

    bias_float: torch.Tensor | None  # the bias in float32, as the kernel adds it before rounding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return native_kernels.linear(input, self.weight, self.out_features, self.bias_float)


class PackedEmbedding(torch.nn.Embedding):
    """An nn.Embedding whose weight is an output head's, packed for the C++ linear kernel
    ([ceil(vocab / 64), hidden / 2, 64, 2]): token t's row is [t // 64, :, t % 64, :]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() and (int(input.min()) < 0 or int(input.max()) >= self.num_embeddings):
            raise IndexError("index out of range in self")  # as nn.Embedding: the padding rows are not tokens
        group = native_kernels.LINEAR_GROUP
        return self.weight[input // group, :, input % group].flatten(-2)


def packing_supported() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_linear_applies() -> bool:
    """The C++ linear kernel builds and runs here (AVX512-BF16), and torch runs one thread."""
    return torch.get_num_threads() == 1 and native_kernels.load() and native_kernels.linear_supported()


def pack_linear_weights(model: torch.nn.Module, batch_rows: int, native: bool = False) -> int:
    """Pack every plain bf16 CPU nn.Linear's weight in place, for oneDNN or (`native`) for the C++
    kernel; returns how many. An output head tied to a plain nn.Embedding is packed for the C++
    kernel with its embedding (`PackedEmbedding` reads rows from the packed weight: still one copy);
    any other shared weight stays as it is."""
    if not (native or packing_supported()):
        return 0
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            holders.setdefault(id(weight), []).append(module)
    packed = 0
    with torch.no_grad():
        for module in list(model.modules()):
            weight = getattr(module, "weight", None)
            if (
                type(module) is not torch.nn.Linear  # quantized and adapter layers are subclasses: left alone
                or weight is None
                or weight.dtype != torch.bfloat16
                or weight.device.type != "cpu"
            ):
                continue
            native_fits = native and weight.shape[1] % 2 == 0
            if uses.get(id(weight), 0) != 1:
                embedding = _tied_embedding(module, holders.get(id(weight), []), uses.get(id(weight), 0))
                if not (native_fits and embedding is not None):
                    continue
                _to_native(module, weight)
                embedding.weight = module.weight
                embedding.__class__ = PackedEmbedding
            elif native_fits:
                _to_native(module, weight)
            elif packing_supported():
                module.weight = torch.nn.Parameter(
                    torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_rows), requires_grad=False
                )
                module.__class__ = PackedLinear
            else:
                continue
            packed += 1
    return packed


def _tied_embedding(head: torch.nn.Module, holders: list[torch.nn.Module], uses: int) -> torch.nn.Embedding | None:
    """The plain nn.Embedding that shares the head's weight and nothing else does, if there is one
    (subclasses, such as Gemma's scaled embedding, read the weight their own way: left alone)."""
    others = [m for m in holders if m is not head]
    if uses != 2 or len(others) != 1 or type(others[0]) is not torch.nn.Embedding:
        return None
    embedding = others[0]
    return embedding if embedding.max_norm is None else None


def _to_native(module: torch.nn.Module, weight: torch.Tensor) -> None:
    module.weight = torch.nn.Parameter(native_kernels.pack_linear(weight.detach()), requires_grad=False)
    module.bias_float = None if module.bias is None else module.bias.detach().float()
    module.__class__ = NativeLinear
