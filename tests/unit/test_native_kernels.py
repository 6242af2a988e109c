"""The C++ decode attention (runners/native_kernels.py) against the torch path it stands in for,
built on this machine as the engine builds it; and what happens without a compiler."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from runners import native_kernels
from runners.cpu_speedups import decode_attention

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels with")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert native_kernels.load()
    yield
    torch.set_num_threads(threads)


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _torch_path(query, key, value, visible, scale):
    """The float32 torch path, with the native kernel out of the way."""
    kernel, native_kernels._kernel = native_kernels._kernel, None
    try:
        mask = None if visible is None else visible[:, None, None, :]
        return decode_attention(_Attention(1), query, key, value, mask, scaling=scale)[0]
    finally:
        native_kernels._kernel = kernel


@pytest.mark.parametrize("dim", [64, 128, 48, 8])  # the AVX-512 sizes, and the plain C++ path
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2), (6, 1)])
def test_the_kernel_matches_the_float32_torch_path(dim, heads, kv_heads) -> None:
    torch.manual_seed(dim + heads + kv_heads)
    rows, width = 3, 45
    query = torch.randn(rows, heads, 1, dim, dtype=torch.bfloat16)
    # Key/value as the slot cache hands them over: the first `width` columns of wider buffers.
    key = torch.randn(rows + 2, kv_heads, 64, dim, dtype=torch.bfloat16)[:rows, :, :width]
    value = torch.randn(rows + 2, kv_heads, 64, dim, dtype=torch.bfloat16)[:rows, :, :width]
    visible = torch.ones(rows, width, dtype=torch.bool)
    visible[1, 20:] = False  # a shorter row
    visible[2, :-1] = False  # a row that sees only its new token
    for mask in (visible, None):
        ours = native_kernels.decode_attention(query, key, value, mask, dim**-0.5)
        assert ours is not None and ours.shape == (rows, 1, heads, dim) and ours.dtype == torch.bfloat16
        theirs = _torch_path(query, key, value, mask, dim**-0.5)
        # Both accumulate in float32 and round once to bf16: they differ in the last bit at most.
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=8e-3)
        assert (ours != theirs).float().mean() < 0.01


def test_large_scores_and_masked_columns_stay_finite() -> None:
    """Scores far from 0 (exp's range) and masked columns holding anything do not leak through."""
    query = torch.full((1, 2, 1, 64), 30.0, dtype=torch.bfloat16)
    key = torch.randn(1, 2, 10, 64, dtype=torch.bfloat16)
    value = torch.randn(1, 2, 10, 64, dtype=torch.bfloat16)
    value[:, :, 5:] = float("nan")  # behind the mask: never read into the result
    visible = torch.zeros(1, 10, dtype=torch.bool)
    visible[0, :5] = True
    ours = native_kernels.decode_attention(query, key, value, visible, 1.0)
    assert ours is not None and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, _torch_path(query, key, value[:, :, :10].nan_to_num(), visible, 1.0))


def test_where_the_kernel_does_not_apply_the_torch_path_answers() -> None:
    query = torch.randn(2, 4, 1, 64, dtype=torch.bfloat16)
    key = value = torch.randn(2, 2, 7, 64, dtype=torch.bfloat16)
    blind = torch.ones(2, 7, dtype=torch.bool)
    blind[1] = False  # a row that sees nothing: a wrong mask, left to the torch path
    assert native_kernels.decode_attention(query, key, value, blind, 0.125) is None
    assert native_kernels.decode_attention(query.float(), key.float(), value.float(), None, 0.125) is None
    torch.set_num_threads(2)
    try:  # the kernel runs on one thread: with more, torch's parallel matmuls
        assert native_kernels.decode_attention(query, key, value, None, 0.125) is None
    finally:
        torch.set_num_threads(1)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    via_module, _ = decode_attention(_Attention(2), query, key, value, mask, scaling=0.125)
    torch.testing.assert_close(via_module, native_kernels.decode_attention(query, key, value, mask[:, 0, 0], 0.125))


def test_a_tiny_llama_with_64_wide_heads_decodes_the_stock_greedy_tokens(tmp_path) -> None:
    """The AVX-512 path inside a whole model, against stock transformers (SDPA, unpacked)."""
    from transformers import AutoModelForCausalLM

    from runners.cpu_speedups import apply_cpu_speedups
    from tests.support.greedy import greedy_tokens
    from tests.support.tiny_models import build_tiny_llama

    source = build_tiny_llama(tmp_path, hidden_size=256, layers=2, heads=4, dtype="bfloat16")
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    fast = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    assert "its C++ kernel" in apply_cpu_speedups(fast, batch_rows=1)

    assert greedy_tokens(fast) == greedy_tokens(stock)


def test_builds_are_kept_per_machine_and_a_missing_compiler_leaves_the_torch_path(tmp_path) -> None:
    """In fresh processes: the first builds into the cache folder, the second loads that build; a
    cache that cannot be created moves the build under the temporary directory; with CXX naming no
    compiler, `load` says False and the engine keeps its torch path."""
    probe = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from runners import native_kernels\n"
        "print(native_kernels.load(), sorted(p.name for p in native_kernels.cache_dir().rglob('*')))\n"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True, timeout=300
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("True") and "kernels.so" in first.stdout
    built = next((tmp_path / "ai-server" / "kernels").rglob("kernels.so"))
    mtime = built.stat().st_mtime_ns
    again = run()
    assert again.stdout == first.stdout and built.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    blocked = tmp_path / "a-file"  # a cache under a file cannot be created: the temporary directory
    blocked.write_text("")
    (tmp_path / "tmp").mkdir()
    elsewhere = run(XDG_CACHE_HOME=str(blocked), TMPDIR=str(tmp_path / "tmp"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout.startswith("True")
    assert next((tmp_path / "tmp").rglob("kernels.so"))
    missing = run(CXX=str(tmp_path / "no-such-compiler"))
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.startswith("False") and "torch paths instead" in missing.stderr
