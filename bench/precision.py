"""The precision policy's effect, A/B in one server: `python -m bench.precision`.

The same random-weight Llama saved twice, as bfloat16 (what most Hub checkpoints are) and as
float32, both loaded in one `bentoml serve` (MAX_CACHE_MODELS=2). float32 is what every model
loaded as on CPU before the policy kept bf16; bf16 is what a half-precision checkpoint loads as
now on a CPU with native bf16. Rounds alternate between the two models, so a machine shared with
other work slows both alike, and each bf16 round is divided by the float32 round just before it:
the median of those paired ratios is the figure to trust on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.__main__ import PROMPT, machine
from bench.loadgen import run_round
from bench.server_env import bench_server_env
from tests.support.server_process import running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache

MODELS = {"float32": "bench/llama-fp32", "bfloat16": "bench/llama-bf16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds per level; medians are reported")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--quick", action="store_true", help="smallest size: a smoke check, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens, args.repeats, args.hidden, args.layers = "1,2", 8, 1, 64, 2
    return args


def loaded(url: str) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in httpx.get(f"{url}/models").json()["models"] if m["loaded"]}


def measure(url: str, backend: str, levels: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    for name in MODELS.values():  # load both and warm up
        asyncio.run(run_round(url, "openai", name, PROMPT, 2, 1))
    models = loaded(url)
    rows = []
    for level in levels:
        rates: dict[str, list[float]] = {dtype: [] for dtype in MODELS}
        for _ in range(args.repeats):
            for dtype, name in MODELS.items():
                result = asyncio.run(run_round(url, "openai", name, PROMPT, args.max_tokens, level))
                rates[dtype].append(result.tokens_per_second)
        paired = [b / f for f, b in zip(rates["float32"], rates["bfloat16"], strict=True)]
        rows.append(
            {
                "backend": backend,
                "concurrency": level,
                **{f"{dtype}_tok_s": statistics.median(r) for dtype, r in rates.items()},
                "ratio": statistics.median(paired),
                "ratios": paired,
                **{f"{dtype}_loaded_as": models[name]["quantization"] for dtype, name in MODELS.items()},
                **{f"{dtype}_mib": models[name]["memory_bytes"] / 2**20 for dtype, name in MODELS.items()},
            }
        )
        print(
            f"  {backend} x{level}: float32 {rows[-1]['float32_tok_s']:.0f}, bf16 {rows[-1]['bfloat16_tok_s']:.0f} "
            f"tok/s, paired ratio {rows[-1]['ratio']:.2f}",
            flush=True,
        )
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()['description']}. {args.max_tokens} output tokens per request, OpenAI SSE, "
        f"{args.repeats} paired rounds per level (medians).",
        "",
        "| backend | streams | float32 checkpoint: loaded as | tok/s | model MiB "
        "| bf16 checkpoint: loaded as | tok/s | model MiB | bf16 ÷ float32 (paired) |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['backend']} | {r['concurrency']} | {r['float32_loaded_as']} | {r['float32_tok_s']:.0f} | "
        f"{r['float32_mib']:.0f} | {r['bfloat16_loaded_as']} | {r['bfloat16_tok_s']:.0f} | "
        f"{r['bfloat16_mib']:.0f} | {r['ratio']:.2f}× |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        root = Path(tmp)
        for dtype, name in MODELS.items():  # the same seed: the same weights, bf16 being them rounded
            source = build_tiny_llama(
                root / dtype,
                hidden_size=args.hidden,
                layers=args.layers,
                intermediate_size=args.hidden * 8 // 3,
                heads=max(1, args.hidden // 64),
                context=2048,
                dtype=dtype,
            )
            install_into_hf_cache(source, root / "hf" / "hub", name)
        for backend in args.backends.split(","):
            env = bench_server_env(root, max(levels), MAX_CACHE_MODELS="2", BACKEND=backend)
            print(f"{backend}: both checkpoints in one server", flush=True)
            with running_server(env, root / f"{backend}.log") as url:
                rows += measure(url, backend, levels, args)
    print()
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
