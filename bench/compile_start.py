"""What vLLM's compilation costs and buys on this machine: `python -m bench.compile_start`.

Serves the benchmark's random Llama with BACKEND=vllm three times on one DATA_DIR (where vLLM's and
inductor's compile caches live): compiled with empty caches (the first start), compiled again (the
caches filled), and eager. Each start is timed by the first request's `load_duration` (Ollama's
field: the engine's start, compilation included). Then the compiled and the eager server run side by
side and their rounds alternate (as in bench.versus_vllm), paired tokens/s at each level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import run_round
from bench.server_env import bench_server_env
from bench.versus_vllm import MODEL, PROMPT, build_model
from tests.support.server_process import running_server


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_start", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5, help="alternating rounds per side and level")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def load_seconds(url: str) -> float:
    """Load the model with a one-token request; the engine's start as the server timed it."""
    body = {"model": MODEL, "prompt": "hi", "raw": True, "stream": False, "options": {"num_predict": 1}}
    response = httpx.post(f"{url}/api/generate", json=body, timeout=1800)
    response.raise_for_status()
    return response.json()["load_duration"] / 1e9


def tokens_per_second(url: str, max_tokens: int, level: int) -> float:
    return asyncio.run(run_round(url, "openai", MODEL, PROMPT, max_tokens, level)).tokens_per_second


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        root = Path(tmp)
        build_model(root, args)
        env = bench_server_env(root, max(levels), BACKEND="vllm")
        compiled, eager = {**env, "ENFORCE_EAGER": "false"}, {**env, "ENFORCE_EAGER": "true"}
        with running_server(compiled, root / "compiled-cold.log") as url:
            results["compiled_first_start_s"] = load_seconds(url)
        print(f"compiled, empty caches: {results['compiled_first_start_s']:.1f} s", flush=True)
        with running_server(compiled, root / "compiled-warm.log") as fast:
            results["compiled_later_start_s"] = load_seconds(fast)
            print(f"compiled, caches filled: {results['compiled_later_start_s']:.1f} s", flush=True)
            with running_server(eager, root / "eager.log") as slow:
                results["eager_start_s"] = load_seconds(slow)
                print(f"eager: {results['eager_start_s']:.1f} s", flush=True)
                for url in (fast, slow):  # warm up
                    tokens_per_second(url, 8, max(levels))
                results["levels"] = []
                for level in levels:
                    pairs = []
                    for i in range(args.pairs):
                        order = (fast, slow) if i % 2 else (slow, fast)
                        measured = {url: tokens_per_second(url, args.max_tokens, level) for url in order}
                        pairs.append((measured[fast], measured[slow]))
                    row = {
                        "concurrency": level,
                        "compiled_tok_s": statistics.median(c for c, _ in pairs),
                        "eager_tok_s": statistics.median(e for _, e in pairs),
                        "ratio_median": statistics.median(c / e for c, e in pairs),
                        "ratios": [round(c / e, 3) for c, e in pairs],
                        "load_average": os.getloadavg()[0],
                    }
                    results["levels"].append(row)
                    print(
                        f"x{level}: compiled {row['compiled_tok_s']:.1f} tok/s, eager {row['eager_tok_s']:.1f}, "
                        f"ratio {row['ratio_median']:.3f} {row['ratios']}, load {row['load_average']:.2f}",
                        flush=True,
                    )
    results["load_average_after"] = os.getloadavg()
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
