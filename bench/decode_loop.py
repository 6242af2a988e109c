"""The transformers engine's decode loop alone: `python -m bench.decode_loop [LEVELS] [BASELINE.py] [OPTIONS]`.

Builds the benchmark's random Llama (768 wide, 12 layers, bf16), drives runners/batching.py's
scheduler directly with N greedy 64-token requests submitted at once (no pool, no HTTP) and prints
the median tokens/s of 3 rounds per level. With a BASELINE (another version of runners/batching.py,
e.g. `git show main:runners/batching.py > /tmp/main_batching.py`) both schedulers drive the same
model in this process, their rounds alternating (6 each, which goes first alternating too), so a
machine that speeds up or slows down moves both alike. The model gets what the engine gives a model
on CPU (runners/cpu_speedups.py: packed weights, the decode attention, CPU_THREADS' default);
`--stock` leaves it as transformers loads it; `--torch-attention` alternates this loop with its C++
decode attention (runners/native_kernels.py) and without it (the torch path); `--onednn-linear`
alternates it with a second copy of the model whose linear weights are packed for oneDNN instead of
the C++ linear kernel. Run it under the bench lock.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import runners.batching
from bench.__main__ import PROMPT
from runners import native_kernels
from runners.base import Chunk, GenerationRequest, PreparedPrompt, SamplingOptions
from runners.cpu_speedups import apply_cpu_speedups, engine_threads
from tests.support.tiny_models import build_tiny_llama

NEW_TOKENS = 64


def load_baseline(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_batching", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m bench.decode_loop", description=__doc__.splitlines()[0])
    parser.add_argument("levels", nargs="?", default="1,8", help="streams per round, comma-separated")
    parser.add_argument("baseline", nargs="?", help="another runners/batching.py, run alternating with this one")
    parser.add_argument("--stock", action="store_true", help="no CPU fast paths, torch's default threads")
    parser.add_argument(
        "--torch-attention", action="store_true", help="alternate with the decode attention's torch path as baseline"
    )
    parser.add_argument(
        "--onednn-linear", action="store_true", help="alternate with oneDNN's packed linear layers as baseline"
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    loops = {"this": runners.batching}
    if args.baseline:
        loops["baseline"] = load_baseline(args.baseline)
    with tempfile.TemporaryDirectory(prefix="decode-loop-") as tmp:
        source = build_tiny_llama(
            Path(tmp), hidden_size=768, layers=12, intermediate_size=2048, heads=12, context=2048, dtype="bfloat16"
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
        onednn = None
        if args.onednn_linear:
            onednn = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    if not args.stock:  # as TransformersRunner.load on CPU
        torch.set_num_threads(engine_threads(0))
        print("CPU fast paths:", ", ".join(apply_cpu_speedups(model, max(levels))), flush=True)
        if onednn is not None:
            print("baseline:", ", ".join(apply_cpu_speedups(onednn, max(levels), native_linear=False)), flush=True)
    gc.collect()
    gc.freeze()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    eos = frozenset([tokenizer.eos_token_id])
    schedulers = {name: (module, module.BatchScheduler(model, name, max(levels))) for name, module in loops.items()}
    kernel = native_kernels._kernel
    kernels = {name: kernel for name in schedulers}  # the C++ decode attention each variant runs with
    if onednn is not None:
        schedulers["oneDNN linear"] = (runners.batching, runners.batching.BatchScheduler(onednn, "onednn", max(levels)))
        kernels["oneDNN linear"] = kernel
    if args.torch_attention:
        schedulers["torch attention"] = schedulers["this"]
        kernels["torch attention"] = None

    def run(module: ModuleType, scheduler: Any, n: int, new_tokens: int) -> float:
        """Tokens/s of n requests submitted at once."""
        done = threading.Semaphore(0)

        def emit(chunk: Chunk | BaseException) -> None:
            if isinstance(chunk, BaseException) or chunk.finish_reason:
                done.release()

        started = time.perf_counter()
        for _ in range(n):
            options = SamplingOptions(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            prepared = PreparedPrompt(GenerationRequest(prompt=PROMPT, options=options), PROMPT, ids, new_tokens)
            scheduler.submit(module.Sequence(prepared, tokenizer, eos, "cpu", None, emit))
        for _ in range(n):
            done.acquire()
        return n * new_tokens / (time.perf_counter() - started)

    for module, scheduler in schedulers.values():
        run(module, scheduler, 1, 4)  # warm up (and learn the cache's kind)
    rounds = 3 if len(schedulers) == 1 else 6
    for n in levels:
        rates: dict[str, list[float]] = {name: [] for name in schedulers}
        for i in range(rounds):
            for name in list(schedulers)[:: 1 if i % 2 == 0 else -1]:
                native_kernels._kernel = kernels[name]
                rates[name].append(run(*schedulers[name], n, NEW_TOKENS))
        for name, got in rates.items():
            rounds_text = ", ".join(f"{r:.0f}" for r in got)
            print(f"{n} streams, {name}: {statistics.median(got):.1f} tok/s (rounds: {rounds_text})", flush=True)
    for _, scheduler in {id(s): s for s in schedulers.values()}.values():
        scheduler.close()


if __name__ == "__main__":
    main()
