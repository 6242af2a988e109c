"""Benchmark the serving stack: `python -m bench` (or `make bench`).

Builds a random-weight Llama (no hub needed), serves it with the real `bentoml serve`, drives the
OpenAI and Ollama streaming endpoints at each concurrency level, and in the same run measures the
baselines: the same engine in-process on the same batch, the server's own runner in-process (no
HTTP), and (transformers) one-request-at-a-time serving. Prints a markdown table with the targets'
ratios; writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.baselines import run_baseline, server_dtype
from bench.loadgen import (
    DIALECTS,
    LoadResult,
    alternating_rounds,
    run_round,
    server_ttft,
    single_stream_ttfts,
    summarize,
    versus_dialect,
)
from bench.plot import render
from bench.report import markdown, targets, write_json
from bench.server_env import bench_server_env
from bench.vllm_server import vllm_own_server
from tests.support.server_process import running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache

MODEL = "bench/random-llama"
PROMPT = "Tell me a long story about the sea, the wind and a small boat that " * 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels (default 1,4,8,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (fixed length)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per level; medians are reported")
    parser.add_argument("--ttft-samples", type=int, default=20, help="single requests timed for the TTFT target")
    parser.add_argument("--hidden", type=int, default=768, help="model width (768 with 12 layers: ~90M parameters)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", help="the checkpoint's dtype (most Hub models: bfloat16)")
    parser.add_argument("--backends", default="auto", help="transformers,vllm or auto (vLLM when importable)")
    parser.add_argument("--settle", type=float, default=3, help="seconds of quiet before each paired round (default 3)")
    parser.add_argument("--quick", action="store_true", help="smallest size: a smoke check, not a measurement")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNG")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens, args.repeats, args.hidden, args.layers = "1,2", 8, 1, 64, 2
        args.ttft_samples, args.settle = 3, 0
    return args


def machine() -> dict[str, str]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {
        "description": f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def baseline_rows(backend: str, kind: str, measured: dict[int, dict[str, float]], max_tokens: int) -> list[dict]:
    return [
        {
            "backend": backend,
            "kind": kind,
            "dialect": None,
            "concurrency": level,
            "ttft_p50_ms": m["ttft_ms"],
            "tokens_per_second": m["tokens_per_second"],
            "requests_per_second": m["tokens_per_second"] / max_tokens,
        }
        for level, m in measured.items()
    ]


def http_rows(
    url: str, backend: str, kind: str, levels: list[int], args: argparse.Namespace, dialects: tuple[str, ...] = DIALECTS
) -> list[dict[str, Any]]:
    rows = []
    asyncio.run(run_round(url, dialects[0], MODEL, PROMPT, 2, 1))  # load and warm up
    for dialect in dialects:
        for level in levels:
            rounds = [
                asyncio.run(run_round(url, dialect, MODEL, PROMPT, args.max_tokens, level)) for _ in range(args.repeats)
            ]
            rows.append(_row(backend, kind, dialect, level, rounds))
    return rows


def _row(backend: str, kind: str, dialect: str, level: int, rounds: list[LoadResult], **extra: Any) -> dict[str, Any]:
    row = {"backend": backend, "kind": kind, "dialect": dialect, "concurrency": level, **summarize(rounds), **extra}
    print(
        f"  {backend} {kind} {dialect} x{level}: {row['tokens_per_second']:.0f} tok/s, load generator "
        f"{row['client_cpu_cores']:.2f} cores"
        + (f", {row['paired_ratio']:.2f}x vLLM's server (paired)" if "paired_ratio" in row else ""),
        flush=True,
    )
    return row


def paired_rows(backend: str, ours: str, theirs: str, levels: list[int], args: argparse.Namespace) -> list[dict]:
    """This server (on `backend`) and vLLM's own server, both running, their rounds alternating
    (which goes first alternates too): a machine that speeds up or slows down between rounds moves
    both alike. Each of our rows carries `paired_ratio`, the median of its rounds each divided by the
    vLLM round beside it. The Ollama dialect is paired with vLLM's OpenAI stream (vLLM has no Ollama
    API). vLLM's rounds are rows of their own (kind "vllm-server beside <backend>")."""
    rows = []
    for url in (ours, theirs):  # load and warm up
        asyncio.run(run_round(url, "openai", MODEL, PROMPT, 2, max(levels)))
    for dialect in (*DIALECTS, "openai-json"):
        versus = versus_dialect(dialect)
        for level in levels:
            mine, vllms = alternating_rounds(
                ours,
                theirs,
                dialect,
                level,
                args.repeats,
                model=MODEL,
                prompt=PROMPT,
                max_tokens=args.max_tokens,
                settle=args.settle,
            )
            ratio = statistics.median(
                m.tokens_per_second / v.tokens_per_second for m, v in zip(mine, vllms, strict=True)
            )
            rows.append(_row(backend, "http", dialect, level, mine, paired_ratio=ratio, versus=versus))
            if dialect == versus:
                rows.append(_row("vllm", f"vllm-server beside {backend}", dialect, level, vllms))
    return rows


def server_memory(url: str, backend: str) -> dict[str, Any]:
    """The loaded model's precision and size as the server reports them (/models), and the resident
    memory of the server's whole process tree (the bench's only children while a server runs)."""
    import httpx
    import psutil

    [entry] = [m for m in httpx.get(f"{url}/models").json()["models"] if m["model"] == MODEL]
    rss = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True))
    return {
        "backend": backend,
        "quantization": entry["quantization"],
        "reason": entry["quantization_reason"],
        "model_bytes": entry["memory_bytes"],
        "server_rss_bytes": rss,
    }


def single_stream_rows(url: str, backend: str, samples: int) -> list[dict[str, Any]]:
    """TTFT of one stream at a time, per dialect: as the client sees it, and as the server's
    /metrics records it (from request start inside the server to the first token)."""
    rows = []
    for dialect in DIALECTS:
        sum_before, count_before = server_ttft(url)
        ttfts = asyncio.run(single_stream_ttfts(url, dialect, MODEL, PROMPT, samples))
        sum_after, count_after = server_ttft(url)
        rows.append(
            {
                "backend": backend,
                "dialect": dialect,
                "samples": samples,
                "http_p50_ms": statistics.median(ttfts) * 1000,
                "http_mean_ms": statistics.mean(ttfts) * 1000,
                "server_mean_ms": (sum_after - sum_before) / (count_after - count_before) * 1000,
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    backends = ["transformers", "vllm"] if args.backends == "auto" else args.backends.split(",")
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed: no vLLM rows")
        backends.remove("vllm")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        heads = max(1, args.hidden // 64)  # head size 64: vLLM's CPU attention has kernels for it
        source = build_tiny_llama(
            root / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            intermediate_size=args.hidden * 8 // 3,
            heads=heads,
            context=2048,
            dtype=args.dtype,
        )
        install_into_hf_cache(source, root / "hf" / "hub", MODEL)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with torch.device("meta"):  # counts parameters without allocating them
            parameters = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).num_parameters()
        results: dict[str, Any] = {
            "machine": machine(),
            "config": {
                "parameters": parameters,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                "ttft_samples": args.ttft_samples,
                "prompt_tokens": len(AutoTokenizer.from_pretrained(source)(PROMPT)["input_ids"]),
                "concurrency": levels,
                "reference_concurrency": 8 if 8 in levels else max(levels),
            },
            "rows": [],
            "single_stream_ttft": [],
            "memory": [],
        }
        base_env = bench_server_env(root, max(levels))
        for backend in backends:
            server_env = {**base_env, "BACKEND": backend}
            measure = (args.max_tokens, args.repeats, args.ttft_samples, levels)
            print(f"{backend}: in-process baseline", flush=True)
            raw = run_baseline(backend, str(source), PROMPT, *measure)
            results["rows"] += baseline_rows(backend, "in-process", raw, args.max_tokens)
            print(f"{backend}: the server's runner without HTTP", flush=True)
            runner = run_baseline("runner", MODEL, PROMPT, *measure, server_env)
            results["rows"] += baseline_rows(backend, "runner", runner, args.max_tokens)
            print(f"{backend}: over HTTP", flush=True)
            with running_server(server_env, root / f"{backend}.log") as url:
                if "vllm" in backends:
                    print(f"{backend}: beside vLLM's own OpenAI server (the same engine settings), rounds alternating")
                    with vllm_own_server(
                        source, MODEL, server_dtype(source), max(levels), base_env, root / f"vllm-beside-{backend}.log"
                    ) as theirs:
                        results["rows"] += paired_rows(backend, url, theirs, levels, args)
                else:
                    results["rows"] += http_rows(url, backend, "http", levels, args, (*DIALECTS, "openai-json"))
                results["single_stream_ttft"] += single_stream_rows(url, backend, args.ttft_samples)
                results["memory"].append(server_memory(url, backend))
        if "transformers" in backends:
            print("transformers: one request at a time", flush=True)
            serial_env = {**base_env, "BACKEND": "transformers", "MAX_BATCH_SIZE": "1"}
            with running_server(serial_env, root / "serial.log") as url:
                reference = results["config"]["reference_concurrency"]
                results["rows"] += http_rows(url, "transformers", "one-at-a-time", [reference], args, ("openai",))
    results["targets"] = targets(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(results, args.out / f"bench-{stamp}.json")
    render(results, args.out / f"bench-{stamp}.png")
    print()
    print(markdown(results))
    print(f"\nWrote {args.out / f'bench-{stamp}.json'} and {args.out / f'bench-{stamp}.png'}")


if __name__ == "__main__":
    main()
