"""A bf16 checkpoint loaded through the running server (the precision decision itself: tests/unit/test_precision.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runners import native_kernels
from runners.cpu_speedups import DECODE_ATTENTION, NativeLinear, PackedLinear, engine_threads, packing_supported
from runners.quantization import bf16_cpu_feature
from tests.support.bodies import chat_body
from tests.support.tiny_models import build_tiny_llama

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

    runner = current_runtime().pool.get_loaded(BF16_LLAMA).runner
    weights = runner.hf_model
    assert {str(p.dtype) for p in weights.parameters()} == {"torch.bfloat16" if feature else "torch.float32"}
    # The CPU fast paths (runners/cpu_speedups.py; their outputs: tests/unit/test_cpu_speedups.py).
    assert weights.config._attn_implementation == DECODE_ATTENTION
    decode_threads = runner._scheduler.between_steps(torch.get_num_threads)  # asked on the decode thread
    assert decode_threads == engine_threads(0) == max(1, len(os.sched_getaffinity(0)) - 1)
    # Linear weights: for the C++ kernel on one thread where the CPU has AVX512-BF16, else oneDNN's.
    native = bool(feature) and decode_threads == 1 and native_kernels.load() and native_kernels.linear_supported()
    kinds = {type(m) for m in weights.modules()}
    assert (NativeLinear in kinds) == native
    assert (PackedLinear in kinds) == (bool(feature) and not native and packing_supported())

    client = serve(CPU_THREADS="2")  # a restart with the setting: the engine's threads follow it
    assert client.post("/chat", json=chat_body(BF16_LLAMA, max_tokens=1)).status_code == 200
    runner = current_runtime().pool.get_loaded(BF16_LLAMA).runner
    assert runner._scheduler.between_steps(torch.get_num_threads) == 2
    kinds = {type(m) for m in runner.hf_model.modules()}  # the C++ linear kernel runs one thread
    assert NativeLinear not in kinds and (PackedLinear in kinds) == (bool(feature) and packing_supported())
