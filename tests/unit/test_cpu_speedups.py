"""The CPU fast paths (runners/cpu_speedups.py) against what they replace: transformers' SDPA
attention function and torch's own `F.linear`, on random tensors and on a tiny bf16 Llama."""

from __future__ import annotations

import pytest
import torch

from runners.cpu_speedups import (
    DECODE_ATTENTION,
    NativeLinear,
    PackedLinear,
    apply_cpu_speedups,
    decode_attention,
    native_linear_applies,
    pack_linear_weights,
    packing_supported,
)


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2), (6, 1)])
def test_one_token_attention_matches_sdpa_with_padding_masks(dtype, heads, kv_heads) -> None:
    torch.manual_seed(0)
    rows, length, dim = 3, 37, 16
    query = torch.randn(rows, heads, 1, dim, dtype=dtype)
    key = torch.randn(rows, kv_heads, length, dim, dtype=dtype)
    value = torch.randn(rows, kv_heads, length, dim, dtype=dtype)
    # Row 0 sees everything, row 1 is left-padded by 10, row 2 sees only its last 3 columns.
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :10] = False
    mask[2, ..., : length - 3] = False
    module = _Attention(heads // kv_heads)
    for attention_mask in (mask, None):
        ours, _ = decode_attention(module, query, key, value, attention_mask, scaling=0.25)
        theirs, _ = _sdpa(module, query, key, value, attention_mask, scaling=0.25)
        assert ours.shape == theirs.shape == (rows, 1, heads, dim)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


def test_more_than_one_query_token_goes_to_sdpa() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = _Attention(2)
    ours, _ = decode_attention(module, query, key, value, None)
    theirs, _ = _sdpa(module, query, key, value, None)
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not packing_supported(), reason="this CPU has no oneDNN bf16 support to pack for")
def test_packed_weights_give_bit_identical_results_and_tied_heads_stay() -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64, bias=False)).bfloat16()
    tied = torch.nn.Embedding(64, 128).bfloat16()
    model.append(tied)
    shared_head = torch.nn.Linear(128, 64, bias=False).bfloat16()
    shared_head.weight = tied.weight  # an output head tied to the embeddings: left unpacked
    model.append(shared_head)
    inputs = [torch.randn(rows, 64, dtype=torch.bfloat16) for rows in (1, 8, 300)]
    with torch.inference_mode():
        before = [model[1](model[0](x)) for x in inputs]
        assert pack_linear_weights(model, batch_rows=8) == 2
        after = [model[1](model[0](x)) for x in inputs]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert type(model[0]) is PackedLinear and model[0].weight.is_mkldnn
    assert type(shared_head) is torch.nn.Linear and shared_head.weight is tied.weight


def test_a_float32_model_keeps_its_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert pack_linear_weights(model, batch_rows=8) == 0 and type(model[0]) is torch.nn.Linear


def test_a_tiny_llama_decodes_the_same_greedy_tokens(tmp_path) -> None:
    """A whole model: stock transformers (SDPA, unpacked) against the fast paths, decoding a
    left-padded batch of two prompts token by token over a DynamicCache, as the engine does."""
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import build_tiny_llama

    source = build_tiny_llama(tmp_path, hidden_size=128, layers=3, heads=4, dtype="bfloat16")
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    fast = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    applied = apply_cpu_speedups(fast, batch_rows=2)
    assert fast.config._attn_implementation == DECODE_ATTENTION and "decode attention" in applied
    packed = any(type(m) in (PackedLinear, NativeLinear) for m in fast.modules())
    assert packed == (native_linear_applies() or packing_supported())

    def greedy(model) -> list[list[int]]:
        ids = torch.tensor([[0, 0, 0, 5, 9, 11, 40], [7, 8, 9, 10, 11, 12, 13]])
        mask = (ids != 0).long()
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            cache, positions, tokens = out.past_key_values, mask.sum(1), []
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(12):
                tokens.append(token)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(
                    input_ids=token, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache
                )
                positions = positions + 1
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(tokens, dim=1).tolist()

    assert greedy(fast) == greedy(stock)


@pytest.mark.skipif(not packing_supported(), reason="this CPU has no oneDNN bf16 support to pack for")
def test_peft_adapters_run_over_packed_weights(tmp_path) -> None:
    """PEFT wraps the packed layers as it wraps nn.Linear: a mixed-adapter batch (one row with the
    adapter, one without) gives what it gives over the stock model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import build_lora_adapter, build_tiny_llama

    source = build_tiny_llama(tmp_path / "base", hidden_size=128, layers=2, heads=4, dtype="bfloat16")
    adapter = build_lora_adapter(source, tmp_path / "adapter", seed=3, base_name="test-org/base")
    ids = torch.tensor([[5, 9, 11, 40, 41], [7, 8, 9, 10, 11]])

    def logits(speedups: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
        if speedups:
            assert pack_linear_weights(model, batch_rows=2) > 0
        peft = PeftModel.from_pretrained(model, str(adapter), adapter_name="a1", is_trainable=False).eval()
        with torch.inference_mode():
            return peft(input_ids=ids, adapter_names=["a1", "__base__"]).logits

    stock, packed = logits(False), logits(True)
    torch.testing.assert_close(packed, stock, atol=0, rtol=0)
