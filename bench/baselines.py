"""The baselines: the same engine called in-process, no HTTP, on the same batch.

`transformers` and `vllm` are the raw engines (HF `generate`, vLLM's `LLM.generate`) on a model
folder; `runner` is the server's own engine path (model pool, runner, batching) on a model in the
HF cache, so the benchmark can tell what the server's engine costs from what HTTP costs.

Run as `python -m bench.baselines ENGINE MODEL PROMPT MAX_TOKENS REPEATS TTFT_SAMPLES BATCH...`; prints one
JSON object. The benchmark runs each in a subprocess of its own, so a baseline's memory and threads
never compete with a server under test.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# vLLM's synchronous LLM in this one process (the server's AsyncLLM always runs its own processes).
_ENGINE_ENV = {"vllm": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}}


def run_baseline(
    engine: str,
    model: str,
    prompt: str,
    max_tokens: int,
    repeats: int,
    ttft_samples: int,
    batches: list[int],
    env: dict[str, str] | None = None,
) -> dict[int, dict[str, float]]:
    """{batch size: {"tokens_per_second", "ttft_ms"}} for `engine` ("transformers", "vllm" or "runner");
    `env` adds to the environment (the runner reads the server's settings from it)."""
    env = {**os.environ, **_ENGINE_ENV.get(engine, {}), **(env or {})}
    args = [
        sys.executable,
        "-m",
        "bench.baselines",
        engine,
        model,
        prompt,
        str(max_tokens),
        str(repeats),
        str(ttft_samples),
        *map(str, batches),
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"the {engine} baseline failed:\n{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def server_dtype(model_dir: Path) -> str:
    """The dtype the server's precision policy picks for this checkpoint here (e.g. "bfloat16")."""
    import torch

    from runners.quantization import bf16_cpu_feature, decide_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = decide_precision(
        "auto",
        weight_bytes=0,
        threshold_bytes=1,
        device=device,
        config=json.loads((model_dir / "config.json").read_text()),
        bnb_available=False,
        bf16_supported=device == "cuda" and torch.cuda.is_bf16_supported(),
        cpu_bf16=bf16_cpu_feature(),
    )
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision.mode]


def _transformers(
    model_dir: str, prompt: str, max_tokens: int, repeats: int, ttft_samples: int, batches: list[int]
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, server_dtype(Path(model_dir)))  # as the server loads it
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def generate(batch: int, new_tokens: int) -> float:
        inputs = tokenizer([prompt] * batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return _measure(generate, max_tokens, repeats, ttft_samples, batches)


def _vllm(model_dir: str, prompt: str, max_tokens: int, repeats: int, ttft_samples: int, batches: list[int]) -> dict:
    from vllm import LLM, SamplingParams

    from bench.vllm_server import server_eager

    llm = LLM(
        model=model_dir, enforce_eager=server_eager({}), seed=0, max_model_len=2048, dtype=server_dtype(Path(model_dir))
    )

    def generate(batch: int, new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0)
        started = time.perf_counter()
        llm.generate([prompt] * batch, params, use_tqdm=False)
        return time.perf_counter() - started

    return _measure(generate, max_tokens, repeats, ttft_samples, batches)


def _runner(model: str, prompt: str, max_tokens: int, repeats: int, ttft_samples: int, batches: list[int]) -> dict:
    import asyncio

    from runners.base import GenerationRequest, SamplingOptions
    from runners.generation import start_generation
    from runners.pool import ModelPool
    from settings import load_settings

    loop = asyncio.new_event_loop()  # one loop throughout: the runner binds to the loop it first serves
    pool = ModelPool(load_settings())

    async def start() -> None:
        pool.start()

    async def one(new_tokens: int) -> None:
        options = SamplingOptions(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        generation = await start_generation(pool, model, GenerationRequest(prompt=prompt, options=options))
        async for _ in generation.stream():
            pass

    async def together(batch: int, new_tokens: int) -> None:
        await asyncio.gather(*(one(new_tokens) for _ in range(batch)))

    def generate(batch: int, new_tokens: int) -> float:
        started = time.perf_counter()
        loop.run_until_complete(together(batch, new_tokens))
        return time.perf_counter() - started

    loop.run_until_complete(start())
    try:
        return _measure(generate, max_tokens, repeats, ttft_samples, batches)
    finally:
        loop.run_until_complete(pool.close())


def _measure(
    generate: Callable[[int, int], float], max_tokens: int, repeats: int, ttft_samples: int, batches: list[int]
) -> dict:
    """Median throughput of `repeats` full-length runs, and median time to a first token (a one-token
    run) over `ttft_samples` runs: prefill times vary by a few ms, and TTFT targets are that fine."""
    generate(1, 2)  # warm up
    gc.collect()  # loading leaves a full collection due (~0.2 s on this heap): not inside a timed run
    return {
        batch: {
            "tokens_per_second": statistics.median(
                batch * max_tokens / generate(batch, max_tokens) for _ in range(repeats)
            ),
            "ttft_ms": statistics.median(generate(batch, 1) for _ in range(ttft_samples)) * 1000,
        }
        for batch in batches
    }


if __name__ == "__main__":
    engine, model, prompt, max_tokens, repeats, ttft_samples, *batches = sys.argv[1:]
    run = {"transformers": _transformers, "vllm": _vllm, "runner": _runner}[engine]
    measured = run(model, prompt, int(max_tokens), int(repeats), int(ttft_samples), [int(b) for b in batches])
    print(json.dumps(measured))
