"""The transformers engine's decode loop alone: `python -m bench.decode_loop [LEVELS]`.

Builds the benchmark's random Llama (768 wide, 12 layers, bf16), drives runners/batching.py's
scheduler directly with N greedy 64-token requests submitted at once (no pool, no HTTP) and prints
the median tokens/s of 3 rounds per level. Run it under the bench lock beside a baseline.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.__main__ import PROMPT
from runners.base import Chunk, GenerationRequest, PreparedPrompt, SamplingOptions
from runners.batching import BatchScheduler, Sequence
from tests.support.tiny_models import build_tiny_llama

NEW_TOKENS = 64


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    levels = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
    with tempfile.TemporaryDirectory(prefix="decode-loop-") as tmp:
        source = build_tiny_llama(
            Path(tmp), hidden_size=768, layers=12, intermediate_size=2048, heads=12, context=2048, dtype="bfloat16"
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    gc.collect()
    gc.freeze()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    scheduler = BatchScheduler(model, "bench", max(levels))
    eos = frozenset([tokenizer.eos_token_id])

    def run(n: int, new_tokens: int) -> float:
        done = threading.Semaphore(0)

        def emit(chunk: Chunk | BaseException) -> None:
            if isinstance(chunk, BaseException) or chunk.finish_reason:
                done.release()

        started = time.perf_counter()
        for _ in range(n):
            options = SamplingOptions(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            prepared = PreparedPrompt(GenerationRequest(prompt=PROMPT, options=options), PROMPT, ids, new_tokens)
            scheduler.submit(Sequence(prepared, tokenizer, eos, "cpu", None, emit))
        for _ in range(n):
            done.acquire()
        return time.perf_counter() - started

    run(1, 4)  # warm up
    for n in levels:
        rates = [n * NEW_TOKENS / run(n, NEW_TOKENS) for _ in range(3)]
        print(f"{n} streams: {statistics.median(rates):.1f} tok/s (rounds: {', '.join(f'{r:.0f}' for r in rates)})")
    scheduler.close()


if __name__ == "__main__":
    main()
