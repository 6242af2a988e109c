"""This server against vLLM's own OpenAI server, paired: `python -m bench.versus_vllm`.

`--backend vllm` (the default) compares this server's vLLM path with vLLM's server on the same
engine settings (issue #16's target 1); `--backend transformers` compares the transformers engine
with it (target 3: on CPU vLLM's server runs eager, as this server's vLLM path does).

Both servers run at once on the same model (idle, a vLLM engine sleeps), and their rounds alternate
(ours, theirs, ours, ...), so a machine that speeds up or slows down between rounds moves both sides
alike. Each of our rounds is divided by the round of vLLM's server just before or after it; the
median of those ratios is the figure. The Ollama dialect (vLLM has none) is compared with vLLM's
OpenAI SSE stream, the same tokens over the same kind of stream.

`--hold SECONDS` keeps both servers up after the rounds, for a profiler (their pids are printed).
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

from bench.__main__ import MODEL, PROMPT
from bench.baselines import server_dtype
from bench.loadgen import alternating_rounds, run_round, versus_dialect
from bench.server_env import bench_server_env
from bench.vllm_server import vllm_own_server
from tests.support.server_process import running_server
from tests.support.tiny_models import build_tiny_llama, install_into_hf_cache


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.versus_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"), help="this server's engine")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds per side, dialect and level")
    parser.add_argument("--dialects", default="openai,openai-json,ollama")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--settle", type=float, default=0, help="seconds of quiet before each round")
    parser.add_argument("--hold", type=float, default=0, help="seconds to keep the servers up afterwards")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return parser.parse_args()


def build_model(root: Path, args: argparse.Namespace) -> Path:
    source = build_tiny_llama(
        root / "model",
        hidden_size=args.hidden,
        layers=args.layers,
        intermediate_size=args.hidden * 8 // 3,
        heads=max(1, args.hidden // 64),
        context=2048,
        dtype=args.dtype,
    )
    install_into_hf_cache(source, root / "hf" / "hub", MODEL)
    return source


def tokens_per_second(url: str, dialect: str, max_tokens: int, level: int) -> float:
    return asyncio.run(run_round(url, dialect, MODEL, PROMPT, max_tokens, level)).tokens_per_second


def paired(ours: str, theirs: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for level in (int(c) for c in args.concurrency.split(",")):
        for our_dialect in args.dialects.split(","):
            their_dialect = versus_dialect(our_dialect)
            rounds = alternating_rounds(
                ours,
                theirs,
                our_dialect,
                level,
                args.pairs,
                model=MODEL,
                prompt=PROMPT,
                max_tokens=args.max_tokens,
                settle=args.settle,
            )
            mine, vllms = ([r.tokens_per_second for r in side] for side in rounds)
            ratios = [m / v for m, v in zip(mine, vllms, strict=True)]
            row = {
                "dialect": our_dialect,
                "versus": their_dialect,
                "concurrency": level,
                "ours_tok_s": statistics.median(mine),
                "vllm_tok_s": statistics.median(vllms),
                "ratio_median": statistics.median(ratios),
                "ratios": [round(r, 3) for r in ratios],
                "loadavg": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"x{level} {our_dialect:11s} ours {row['ours_tok_s']:6.1f}  vLLM {row['vllm_tok_s']:6.1f}  "
                f"ratio {row['ratio_median']:.3f}  {row['ratios']}  load {row['loadavg']:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop both servers on the way out
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vs-") as tmp:
        root = Path(tmp)
        source = build_model(root, args)
        levels = [int(c) for c in args.concurrency.split(",")]
        env = bench_server_env(root, max(levels))
        print(f"load average before: {os.getloadavg()}", flush=True)
        with (
            vllm_own_server(source, MODEL, server_dtype(source), max(levels), env, root / "vllm.log") as theirs,
            running_server({**env, "BACKEND": args.backend}, root / "ours.log") as ours,
        ):
            for url, dialect in ((ours, "openai"), (theirs, "openai")):  # load and warm up
                tokens_per_second(url, dialect, 8, 1)
                tokens_per_second(url, dialect, 8, max(levels))
            started = time.time()
            rows = paired(ours, theirs, args)
            print(f"{time.time() - started:.0f} s of rounds; load average after: {os.getloadavg()}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=2))
            if args.hold:
                print(f"holding {args.hold:.0f} s: ours {ours}, vLLM {theirs}", flush=True)
                time.sleep(args.hold)


if __name__ == "__main__":
    main()
