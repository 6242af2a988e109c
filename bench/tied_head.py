"""Decode steps of a model shaped like Qwen2.5-0.5B (random weights, bf16, its 151936 x 896 output
head tied to the embeddings): `python -m bench.tied_head [ROWS]`.

Two copies of the model in one process, as the engine prepares them on CPU (runners/cpu_speedups.py)
with one torch thread: linear weights packed for oneDNN, where the tied head stays unpacked (oneDNN
re-lays it out on every call), against the C++ linear kernel, which packs the head with its
embedding. Each round prefills a 48-token prompt per row and times 32 greedy decode steps; rounds
alternate between the copies (which goes first alternating too), and the medians of 5 are printed
in ms per step. Run it under the bench lock; it needs about 3 GB of memory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from runners.cpu_speedups import apply_cpu_speedups

STEPS = 32
PROMPT_TOKENS = 48
ROUNDS = 5


def qwen_shaped() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def step_ms(model: torch.nn.Module, rows: int) -> float:
    """Median ms of STEPS greedy decode steps after a PROMPT_TOKENS prefill, rows at a time."""
    ids = torch.randint(0, 1000, (rows, PROMPT_TOKENS))
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids)
        token = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        for _ in range(STEPS):
            started = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tied_head", description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", default="1,8", help="rows per decode step, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU_THREADS' default on 2 cores; the C++ kernel's condition
    onednn = qwen_shaped()
    native = copy.deepcopy(onednn)
    print("oneDNN copy:", ", ".join(apply_cpu_speedups(onednn, 8, native_linear=False)), flush=True)
    print("C++ copy:", ", ".join(apply_cpu_speedups(native, 8)), flush=True)
    copies = {"oneDNN, head unpacked": onednn, "C++ kernel, head packed": native}
    for rows in [int(r) for r in args.rows.split(",")]:
        for model in copies.values():
            step_ms(model, rows)  # warm up
        results: dict[str, list[float]] = {name: [] for name in copies}
        for i in range(ROUNDS):
            for name in list(copies)[:: 1 if i % 2 == 0 else -1]:
                results[name].append(step_ms(copies[name], rows))
        base, ours = (statistics.median(results[name]) for name in copies)
        for name, got in results.items():
            rounds = ", ".join(f"{t:.1f}" for t in got)
            print(f"{rows} rows, {name}: {statistics.median(got):.1f} ms/step (rounds: {rounds})", flush=True)
        print(f"{rows} rows: {base / ours:.2f}x the steps per second", flush=True)


if __name__ == "__main__":
    main()
