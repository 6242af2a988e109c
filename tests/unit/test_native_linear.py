"""The C++ bf16 linear kernel (runners/native/linear_bf16.cpp) against torch's own linear, and the
engine's choice between it and oneDNN's packing (runners/cpu_speedups.py), built on this machine as
the engine builds it."""

from __future__ import annotations

import shutil

import pytest
import torch

from runners import native_kernels
from runners.cpu_speedups import (
    NativeLinear,
    PackedEmbedding,
    PackedLinear,
    apply_cpu_speedups,
    pack_linear_weights,
)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels with")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if not (native_kernels.load() and native_kernels.linear_supported()):
        pytest.skip("this CPU has no AVX512-BF16: the engine keeps oneDNN's packing (tested in test_cpu_speedups)")
    yield
    torch.set_num_threads(threads)


def _layer(outputs: int, inputs: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(inputs, outputs, bias=bias).bfloat16()
    with torch.no_grad():
        layer.weight.normal_(0, inputs**-0.5)
        if bias:
            layer.bias.normal_(0, 1)
    return layer


def _pack(layer: torch.nn.Linear) -> torch.nn.Linear:
    model = torch.nn.Sequential(layer)
    assert pack_linear_weights(model, batch_rows=8, native=True) == 1
    assert type(model[0]) is NativeLinear
    return model[0]


@pytest.mark.parametrize(("outputs", "inputs"), [(64, 32), (100, 48), (130, 768), (2048, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_matches_torch_within_one_rounding(outputs, inputs, bias) -> None:
    """Against the float32 product rounded once to bf16 (what torch's bf16 linear computes): every
    row count of a register block and its remainders, widths that leave a partial group."""
    layer = _layer(outputs, inputs, bias)
    weight = layer.weight.float()
    bias_float = None if layer.bias is None else layer.bias.float()
    reference = {rows: torch.randn(rows, inputs, dtype=torch.bfloat16) for rows in (1, 2, 3, 5, 6, 7, 8, 13, 50)}
    expected = {rows: torch.nn.functional.linear(x.float(), weight, bias_float) for rows, x in reference.items()}
    native = _pack(layer)
    with torch.inference_mode():
        for rows, x in reference.items():
            got = native(x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, outputs)
            # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value.
            torch.testing.assert_close(got.float(), expected[rows], rtol=2**-7, atol=1e-3)


def test_a_rows_result_does_not_depend_on_what_it_is_batched_with() -> None:
    """Bit for bit: the batched engine's outputs stay those of the request run alone."""
    native = _pack(_layer(300, 256, bias=True, seed=1))
    x = torch.randn(17, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        batched = native(x)
        for row in range(17):
            assert torch.equal(native(x[row : row + 1]), batched[row : row + 1])
        assert torch.equal(native(x[3:11]), batched[3:11])


def test_views_other_shapes_and_dtypes_and_nan_rows() -> None:
    layer = _layer(96, 64, bias=False, seed=2)
    weight = layer.weight.detach().clone()
    native = _pack(layer)
    wide = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        strided = wide[..., ::2]  # inputs not contiguous: copied first
        torch.testing.assert_close(native(strided), torch.nn.functional.linear(strided, weight), rtol=2**-7, atol=1e-3)
        assert native(wide[..., :64]).shape == (2, 5, 96)  # rows with a stride longer than the inputs
        as_float = native(wide[0, :, :64].float())
        assert as_float.dtype == torch.float32 and as_float.shape == (5, 96)
        assert native(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 96)
        x = torch.randn(4, 64, dtype=torch.bfloat16)
        x[1, 7] = float("nan")
        out = native(x)
        assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()


def test_what_goes_to_onednn_and_what_stays_unpacked() -> None:
    """An odd number of inputs (no pairs) falls to oneDNN's packing; a head tied to an embedding
    subclass (which reads the weight its own way, as Gemma's scaled one) stays as it is."""

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2.0

    scaled = ScaledEmbedding(64, 128).bfloat16()
    head = torch.nn.Linear(128, 64, bias=False).bfloat16()
    head.weight = scaled.weight
    model = torch.nn.Sequential(torch.nn.Linear(64, 128).bfloat16(), torch.nn.Linear(33, 8).bfloat16(), scaled, head)
    assert pack_linear_weights(model, batch_rows=8, native=True) == 2
    assert type(model[0]) is NativeLinear and type(model[1]) is PackedLinear
    assert type(head) is torch.nn.Linear and head.weight is scaled.weight and type(scaled) is ScaledEmbedding


def test_a_head_tied_to_the_embeddings_is_packed_once_with_them() -> None:
    """The output head is the largest matrix of small tied models (Qwen2.5-0.5B: 151936 x 896), and
    unpacked it is re-laid out for oneDNN on every call. Packed, the embedding reads its rows from
    the packed weight: one copy, the same rows, and out-of-range tokens still refused."""
    torch.manual_seed(4)
    embedding = torch.nn.Embedding(100, 64).bfloat16()  # 100 rows: the last group is partly padding
    head = torch.nn.Linear(64, 100, bias=False).bfloat16()
    head.weight = embedding.weight
    original = embedding.weight.detach().clone()
    model = torch.nn.Sequential(embedding, head)
    assert pack_linear_weights(model, batch_rows=8, native=True) == 1
    assert type(head) is NativeLinear and type(embedding) is PackedEmbedding and head.weight is embedding.weight
    ids = torch.tensor([[0, 63, 64, 99], [5, 5, 70, 1]])
    with torch.inference_mode():
        assert torch.equal(embedding(ids), original[ids])
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        expected = torch.nn.functional.linear(x.float(), original.float())
        torch.testing.assert_close(head(x).float(), expected, rtol=2**-7, atol=1e-3)
        for bad in (torch.tensor([100]), torch.tensor([-1])):
            with pytest.raises(IndexError):
                embedding(bad)


def test_a_tied_llama_decodes_the_stock_greedy_tokens_from_one_copy(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.support.greedy import greedy_tokens
    from tests.support.tiny_models import build_tiny_llama

    source = build_tiny_llama(tmp_path, hidden_size=128, layers=2, heads=4, dtype="bfloat16", tie_embeddings=True)
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    fast = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    apply_cpu_speedups(fast, batch_rows=2)
    assert type(fast.lm_head) is NativeLinear and fast.lm_head.weight is fast.get_input_embeddings().weight
    vocab = stock.config.vocab_size
    padding = (-vocab % 64) * stock.config.hidden_size  # the packed head's last group
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in stock.parameters()) + padding

    assert greedy_tokens(fast) == greedy_tokens(stock)


def test_the_engine_picks_the_kernel_on_one_thread_only(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import build_tiny_llama

    source = build_tiny_llama(tmp_path, hidden_size=128, layers=2, heads=4, dtype="bfloat16")
    one = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    assert "linear weights packed for the C++ kernel" in ", ".join(apply_cpu_speedups(one, batch_rows=2))
    assert not any(type(m) is PackedLinear for m in one.modules())
    torch.set_num_threads(2)
    two = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    assert "linear weights packed for oneDNN" in ", ".join(apply_cpu_speedups(two, batch_rows=2))
    assert not any(type(m) is NativeLinear for m in two.modules())


@pytest.mark.parametrize("tied", [False, True])
def test_peft_adapters_run_over_the_kernels_weights(tmp_path, tied) -> None:
    """PEFT wraps the kernel's layers as it wraps nn.Linear: a mixed-adapter batch (one row with the
    adapter, one without) gives what it gives over the stock model, within bf16's rounding; with a
    tied head too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import build_lora_adapter, build_tiny_llama

    source = build_tiny_llama(
        tmp_path / "base", hidden_size=128, layers=2, heads=4, dtype="bfloat16", tie_embeddings=tied
    )
    adapter = build_lora_adapter(source, tmp_path / "adapter", seed=3, base_name="test-org/base")
    ids = torch.tensor([[5, 9, 11, 40, 41], [7, 8, 9, 10, 11]])

    def logits(speedups: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
        if speedups:
            assert pack_linear_weights(model, batch_rows=2, native=True) > 0
        peft = PeftModel.from_pretrained(model, str(adapter), adapter_name="a1", is_trainable=False).eval()
        with torch.inference_mode():
            return peft(input_ids=ids, adapter_names=["a1", "__base__"]).logits.float()

    stock, native = logits(False), logits(True)
    torch.testing.assert_close(native, stock, rtol=0.05, atol=0.05)
    assert torch.equal(native.argmax(-1), stock.argmax(-1))
