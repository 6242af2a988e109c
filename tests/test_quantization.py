"""The precision policy as a pure decision, and a bf16 checkpoint loaded through the running server."""

from __future__ import annotations

from pathlib import Path

import pytest

from runners.quantization import bf16_cpu_feature, checkpoint_dtype, decide_precision
from tests.support.bodies import chat_body
from tests.support.tiny_models import build_tiny_llama

BF16 = {"dtype": "bfloat16"}
FP16 = {"torch_dtype": "float16"}  # older transformers wrote torch_dtype
FP32 = {"dtype": "float32"}


def decide(
    requested: str = "auto",
    *,
    device: str = "cpu",
    config: dict | None = None,
    cpu_bf16: str | None = None,
    bf16_supported: bool = True,
):
    return decide_precision(
        requested,
        weight_bytes=1,
        threshold_bytes=10,
        device=device,
        config=config or {},
        bnb_available=True,
        bf16_supported=bf16_supported,
        cpu_bf16=cpu_bf16,
    )


X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx512f amx_bf16 amx_tile avx512_bf16\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize(
    ("cpuinfo", "feature"),
    [
        (X86_BF16, "avx512_bf16"),
        (X86_AMX, "amx_bf16"),
        (X86_PLAIN, None),
        (ARM_BF16, "bf16"),
        (ARM_PLAIN, None),
        ("", None),
    ],
)
def test_bf16_cpu_feature_reads_x86_flags_and_arm_features(cpuinfo: str, feature: str | None) -> None:
    assert bf16_cpu_feature(cpuinfo) == feature


def test_checkpoint_dtype_reads_either_key_and_defaults_to_float32() -> None:
    assert checkpoint_dtype(BF16) == "bfloat16" and checkpoint_dtype(FP16) == "float16"
    assert checkpoint_dtype({"text_config": {"dtype": "bfloat16"}}) == "bfloat16"
    assert checkpoint_dtype({}) == "float32"


@pytest.mark.parametrize(
    ("requested", "config", "mode", "says"),
    [
        ("auto", BF16, "bf16", "checkpoint's bfloat16"),
        ("no", BF16, "bf16", "checkpoint's bfloat16"),
        ("fp16", BF16, "bf16", "checkpoint's bfloat16"),
        ("auto", FP16, "bf16", "float16 checkpoint in bfloat16"),
        ("auto", FP32, "fp32", "checkpoint's float32"),
        ("no", {}, "fp32", "checkpoint's float32"),
        ("fp16", FP32, "bf16", "half precision asked"),
    ],
)
def test_cpu_with_native_bf16_keeps_half_checkpoints_in_bf16(
    requested: str, config: dict, mode: str, says: str
) -> None:
    precision = decide(requested, config=config, cpu_bf16="avx512_bf16")
    assert precision.mode == mode and says in precision.reason
    if mode == "bf16":
        assert "avx512_bf16" in precision.reason  # the reason names the feature it relied on


@pytest.mark.parametrize("requested", ["auto", "no", "fp16"])
@pytest.mark.parametrize("config", [BF16, FP16, FP32])
def test_cpu_without_native_bf16_loads_float32(requested: str, config: dict) -> None:
    precision = decide(requested, config=config, cpu_bf16=None)
    assert precision.mode == "fp32" and "no native bf16" in precision.reason


def test_over_the_threshold_without_bitsandbytes_the_cpu_rule_still_applies() -> None:
    precision = decide_precision(
        "auto",
        weight_bytes=100,
        threshold_bytes=10,
        device="cpu",
        config=BF16,
        bnb_available=False,
        cpu_bf16="amx_bf16",
    )
    assert precision.mode == "bf16" and "bitsandbytes is unavailable" in precision.reason


def test_cuda_and_quantized_decisions_are_unchanged() -> None:
    assert decide("no", device="cuda", config=FP32).mode == "bf16"
    assert decide("fp16", device="cuda", config=BF16).mode == "fp16"
    assert decide("no", device="cuda", config=BF16, bf16_supported=False).mode == "fp16"
    assert decide("q4", config=BF16, cpu_bf16="avx512_bf16").mode == "nf4"
    prequantized = {**BF16, "quantization_config": {"quant_method": "gptq"}}
    assert decide("no", config=prequantized, cpu_bf16="avx512_bf16").mode == "prequantized"


BF16_LLAMA = "test-org/tiny-llama-bf16"


@pytest.fixture(scope="module")
def bf16_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("bf16-llama"), dtype="bfloat16")


def test_a_bf16_checkpoint_loads_as_this_cpu_allows(serve, install_model, bf16_llama_dir: Path) -> None:
    install_model(bf16_llama_dir, BF16_LLAMA)
    client = serve()
    reply = client.post("/chat", json=chat_body(BF16_LLAMA, max_tokens=3, temperature=0))
    assert reply.status_code == 200 and reply.json()["eval_count"] >= 1

    [entry] = [m for m in client.get("/models").json()["models"] if m["model"] == BF16_LLAMA]
    feature = bf16_cpu_feature()
    if feature:  # this machine (AVX512-BF16): the checkpoint's precision, half float32's memory
        assert entry["quantization"] == "bf16" and feature in entry["quantization_reason"]
    else:
        assert entry["quantization"] == "fp32" and "no native bf16" in entry["quantization_reason"]
    from tests.support.server_process import current_runtime

    weights = current_runtime().pool.get_loaded(BF16_LLAMA).runner._hf_model
    assert {str(p.dtype) for p in weights.parameters()} == {"torch.bfloat16" if feature else "torch.float32"}
