"""What serving LoRA adapters costs: `python -m bench.lora`.

Builds a random Llama and two random LoRA adapters of it, serves them with the real `bentoml serve`
on each engine, and measures output tokens/s of N concurrent streams (OpenAI SSE, fixed length):
all N for the base, N split over the two adapters, and N split over the base and both adapters.
The base-only row on an engine that has adapters attached is the price every base request pays for
LoRA being enabled; the mixed rows show that different adapters share one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import _one
from tests.support.server_process import in_process_env, running_server
from tests.support.tiny_models import build_lora_adapter, build_tiny_llama

BASE, ADAPTERS = "bench/lora-base", ("bench/lora-a", "bench/lora-b")
PROMPT = "Tell me a long story about the sea, the wind and a small boat that " * 2


async def streams(url: str, models: list[str], max_tokens: int) -> float:
    """Output tokens/s of one stream per entry of `models`, all sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        started = time.perf_counter()
        timings = await asyncio.gather(*(_one(client, "openai", m, PROMPT, max_tokens) for m in models))
        return sum(t.tokens for t in timings) / (time.perf_counter() - started)


def measure(url: str, models: list[str], max_tokens: int, repeats: int) -> float:
    asyncio.run(streams(url, models, 4))  # warm: loads, adapter attachments
    return statistics.median(asyncio.run(streams(url, models, max_tokens)) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--backends", default="transformers,vllm")
    args = parser.parse_args()
    n = args.streams
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
        root = Path(folder)
        base = build_tiny_llama(root / "base", hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 64)
        models = {BASE: base} | {
            name: build_lora_adapter(base, root / name.replace("/", "-"), seed=i, base_name=BASE, rank=args.rank)
            for i, name in enumerate(ADAPTERS)
        }
        loads = {
            "base only": [BASE] * n,
            "two adapters": [ADAPTERS[i % 2] for i in range(n)],
            "base + two adapters": [(BASE, *ADAPTERS)[i % 3] for i in range(n)],
        }
        print(f"| engine | {n} streams × {args.max_tokens} tokens | tokens/s |\n|---|---|---|")
        for backend in args.backends.split(","):
            env = in_process_env(root / backend, models, backend, MAX_BATCH_SIZE=str(n), KEEP_ALIVE="-1")
            env["BENTOML_HOME"] = str(root / "bentoml")
            with running_server(env, root / f"{backend}.log") as url:
                # The base alone first, before any adapter is attached (vLLM: LoRA is enabled since
                # adapters are pulled; transformers: the plain model, no PEFT layers yet).
                for label, load in loads.items():
                    rate = measure(url, load, args.max_tokens, args.repeats)
                    print(f"| {backend} | {label} | {rate:.0f} |", flush=True)
                rate = measure(url, loads["base only"], args.max_tokens, args.repeats)
                print(f"| {backend} | base only, adapters attached | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
