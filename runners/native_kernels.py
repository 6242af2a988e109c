"""C++ kernels of the transformers engine on CPU, built on this machine at the first load of a model
and called through ctypes; without a C++ compiler the engine keeps its torch paths.

- **Decode attention over bf16 caches** (`native/decode_attention.cpp`). The torch path
  (runners/cpu_speedups.py) converts every layer's cached keys and values to float32 before its two
  matmuls; at 8 rows a third of its time is that conversion. The kernel reads the bf16 cache as it
  is, one (row, key/value head) at a time, and accumulates in float32 as the torch path does
  (AVX-512 where the CPU has it, plain C++ elsewhere). Measured with the bench's model on this
  project's 2-core EPYC: 2-4x faster per layer at 100-1000 cached tokens.
- **bf16 linear layers** (`native/linear_bf16.cpp`, AVX512-BF16 only). oneDNN's packed matmul reads
  the weights at 11-13 GB/s at one row, where a plain read of this machine's memory runs at 23. The
  kernel streams a weight repacked once for the pair dot product (`vdpbf16ps`): at 1-16 rows
  1.4-2.3x faster than oneDNN's packed call on the bench's shapes, and as fast at a prompt's
  hundreds of rows. Each row's sums run in the same order whatever the batch, so a row's result
  does not depend on what it is batched with.

Built with `-march=native` into a folder keyed by the source, the compiler and the CPU's flags, so a
cache shared between machines of different CPUs never loads a build for another one (under the
temporary directory where the cache cannot be written). Built once per
machine (about a second); each later process loads the build. The kernel runs on one thread: the
engine uses it when torch runs one thread too (CPU_THREADS' default on up to 2 cores), and torch's
parallel matmuls otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("native") / name for name in ("decode_attention.cpp", "linear_bf16.cpp")]
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]

_lock = threading.Lock()
_kernel: Any = None  # decode_attention_bf16, once built and loaded
_linear: Any = None  # linear_bf16, where the build has its AVX512-BF16 path
_tried = False

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# decode_attention_bf16's C signature (native/decode_attention.cpp).
_ARGUMENTS: list[Any] = [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR]
_ARGUMENTS += [_I64, _I64, _I64, _I64, ctypes.c_float, _I64, _I64]
_LINEAR_ARGUMENTS: list[Any] = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64]
LINEAR_GROUP = 64  # outputs per packed group (native/linear_bf16.cpp's kGroup)


def cache_dir() -> Path:
    """Where builds are kept: $XDG_CACHE_HOME (or ~/.cache)/ai-server/kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ai-server" / "kernels"


def _writable_folder(key: str) -> Path:
    """cache_dir()/key, created; a folder of this user's under the temporary directory where the
    cache cannot be written (a read-only home in a container)."""
    for root in (cache_dir(), Path(tempfile.gettempdir()) / f"ai-server-kernels-{os.getuid()}"):
        try:
            (root / key).mkdir(parents=True, exist_ok=True)
            if os.access(root / key, os.W_OK):
                return root / key
        except OSError:
            continue
    raise OSError(f"no writable folder for the kernels' build (tried {cache_dir()} and the temporary directory)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [source.read_text() for source in SOURCES]
    key_text = "\n".join([*sources, " ".join(FLAGS), version, platform.machine(), _cpu_flags()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    target = cache_dir() / key / "kernels.so"
    if target.exists():
        return target
    target = _writable_folder(key) / "kernels.so"
    if target.exists():
        return target
    # Built beside the target and renamed onto it: processes building at once each load a whole file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", partial]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def load() -> bool:
    """Build (or find) and load the kernels; True when they are usable. Failures are logged once."""
    global _kernel, _linear, _tried
    with _lock:
        if _tried:
            return _kernel is not None
        _tried = True
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not compiler:
            logger.info("no C++ compiler on this machine: the CPU kernels leave their work to torch and oneDNN")
            return False
        try:
            library = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            logger.warning("building the CPU kernels failed (%s %s): torch paths instead", exc, detail[-500:])
            return False
        kernel = library.decode_attention_bf16
        kernel.argtypes = _ARGUMENTS
        kernel.restype = ctypes.c_int
        _kernel = kernel
        if library.linear_bf16_supported():
            library.linear_bf16.argtypes = _LINEAR_ARGUMENTS
            library.linear_bf16.restype = None
            _linear = library.linear_bf16
        return True


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> torch.Tensor | None:
    """Attention of one new token per row: query [b, heads, 1, d], key/value [b, kv heads, n, d] (bf16,
    on CPU, the last dimension contiguous), visible [b, n] bool or None (every column). Returns
    [b, 1, heads, d], or None where the kernel does not apply (not loaded, another dtype or layout,
    more than one torch thread, a row that sees nothing): the caller's torch path answers then."""
    kernel = _kernel
    if kernel is None or torch.get_num_threads() != 1:
        return None
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    if not (
        query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and heads % kv_heads == 0
        and (visible is None or (visible.dtype == torch.bool and tuple(visible.shape) == (batch, columns)))
    ):
        return None
    if visible is not None:
        visible = visible.contiguous()
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype)
    failed = kernel(
        query.data_ptr(), query.stride(0), query.stride(1),
        key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
        None if visible is None else visible.data_ptr(), out.data_ptr(),
        heads, kv_heads, columns, dim, scale, 0, batch * kv_heads,
    )  # fmt: skip
    return None if failed else out


def linear_supported() -> bool:
    """Whether the linear kernel is loaded (this CPU has AVX512-BF16); call `load()` first."""
    return _linear is not None


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [out, in] (in even) laid out for `linear` (native/linear_bf16.cpp's packed
    layout): [ceil(out / 64), in / 2, 64, 2], the outputs past `out` zero."""
    assert weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 2 == 0
    outputs, inputs = weight.shape
    padded = torch.nn.functional.pad(weight, (0, 0, 0, -outputs % LINEAR_GROUP))
    groups = padded.shape[0] // LINEAR_GROUP
    return padded.view(groups, LINEAR_GROUP, inputs // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, outputs: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] times a `pack_linear` weight, plus bias (float32, or None): [..., outputs], in
    x's dtype (computed in bf16 with float32 sums, as torch's bf16 linear). On the calling thread."""
    assert _linear is not None
    inputs = x.shape[-1]
    rows = x.reshape(-1, inputs)
    if rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < inputs):
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], outputs, dtype=torch.bfloat16)
    if rows.shape[0]:
        _linear(
            rows.data_ptr(), rows.stride(0), rows.shape[0], inputs, packed.data_ptr(), outputs,
            None if bias is None else bias.data_ptr(), out.data_ptr(), outputs, 0, packed.shape[0],
        )  # fmt: skip
    return out.view(*x.shape[:-1], outputs).to(x.dtype)
