"""The transformers engine on one GPU, without the server around it: `python3 -m bench.gpu_check`.

Runs where only torch, transformers, tokenizers, safetensors and accelerate are installed (no
BentoML, FastAPI, vLLM or pydantic-settings): it imports the engine's own modules (runners.transformers,
runners.batching) and nothing of the service. It builds a random-weight Llama of about 0.5B
parameters in bf16 (hidden 1024, 24 layers, vocab 32000), loads it the way the server does
(the precision policy's decision, then TransformersRunner.load), and measures:

- the server's runner (continuous batching) at 1/8/32/64 concurrent streams x 128 tokens
  (`ignore_eos`), against transformers' own batched `generate` on the same model in the same run;
- batch-1 decode as a fraction of the memory-bandwidth limit: the bytes of weights one token reads,
  divided by the card's bandwidth as a device-to-device copy measures it in this script;
- that a bf16 checkpoint loads as bf16 on CUDA, and (when bitsandbytes imports) an nf4 load and generation.

`--quick` shrinks everything so the script runs on a CPU in a minute (a check of the script, not a
measurement). Prints markdown; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from runners.base import GenerationRequest, SamplingOptions
from runners.local_cache import LocalModel
from runners.names import ModelRef
from runners.prepare import prepare_prompt
from runners.quantization import Precision, bf16_cpu_feature, bitsandbytes_available, decide_precision
from runners.transformers import TransformersRunner
from tests.support.tiny_models import build_tokenizer

PROMPT = "Tell me a long story about the sea, the wind and a small boat that " * 2
NAME = "bench/gpu-llama"
_SERVICE_PACKAGES = ("bentoml", "fastapi", "vllm", "pydantic_settings", "pydantic", "xgrammar")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent streams, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2, help="runs per level; the best is reported")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: checks the script on a CPU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.max_tokens, args.hidden, args.layers, args.vocab, args.repeats = "1,4", 16, 128, 2, 4000, 1
    return args


def build_model(root: Path, hidden: int, layers: int, vocab: int, device: str) -> LocalModel:
    """A random Llama saved as a bf16 checkpoint in `root`, with a small trained tokenizer (ids past
    the tokenizer's ~2k decode to nothing; the model's vocab sets the cost of each step)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    build_tokenizer(root, chat_template=False)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B parameters on the GPU takes a second, on a CPU much longer
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(root, safe_serialization=True)
    del model
    weights = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    return LocalModel(ModelRef(NAME), "0" * 40, root, size, weights, time.time())


def load(local: LocalModel, precision: Precision, device: str, max_batch: int) -> TransformersRunner:
    return TransformersRunner.load(local, precision, device, False, max_batch_size=max_batch)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def runner_rate(runner: TransformersRunner, streams: int, max_tokens: int) -> float:
    """Tokens per second over `streams` concurrent requests through the runner (its batching)."""

    async def one() -> int:
        options = SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        count = 0
        prepared = prepare_prompt(
            runner.tokenizer, GenerationRequest(prompt=PROMPT, options=options), runner.context_length
        )
        async for chunk in runner.generate(prepared):
            count = chunk.completion_tokens or count
        return count

    async def together() -> int:
        return sum(await asyncio.gather(*(one() for _ in range(streams))))

    started = time.perf_counter()
    tokens = asyncio.run(together())
    synchronize(runner.device)
    return tokens / (time.perf_counter() - started)


def generate_rate(model: Any, tokenizer: Any, device: str, streams: int, max_tokens: int) -> float:
    """Tokens per second of transformers' own `generate` on a left-padded batch of `streams` prompts."""
    tokenizer.padding_side = "left"
    inputs = tokenizer([PROMPT] * streams, return_tensors="pt", padding=True).to(device)
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    synchronize(device)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - inputs["input_ids"].shape[1]) * streams / elapsed


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    runs = 20
    started = time.perf_counter()
    for _ in range(runs):
        target.copy_(source)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del source, target
    return 2 * megabytes * 2**20 * runs / elapsed


def bytes_per_token(model: Any) -> int:
    """Weight bytes one decode step reads: every parameter, except that the input embedding
    contributes one row (the output projection, untied here, is read whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    return total - embedding.numel() * embedding.element_size() + embedding.shape[1] * embedding.element_size()


def check_nf4(local: LocalModel, device: str, max_tokens: int) -> dict[str, Any]:
    import bitsandbytes as bnb

    precision = decide_precision(
        "q4",
        weight_bytes=local.weight_bytes,
        threshold_bytes=0,
        device=device,
        config=local.config(),
        bnb_available=True,
    )
    runner = load(local, precision, device, 1)
    try:
        four_bit = [m for m in runner._hf_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        runner_rate(runner, 1, 4)  # warm up
        rate = runner_rate(runner, 1, max_tokens)
        return {
            "mode": precision.mode,
            "linear4bit_layers": len(four_bit),
            "memory_mib": runner.memory_bytes() / 2**20,
            "tok_s_1_stream": rate,
        }
    finally:
        runner.unload()


def main() -> None:
    args = parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})"
    results: dict[str, Any] = {
        "device": card,
        "torch": torch.__version__,
        "levels": levels,
        "max_tokens": args.max_tokens,
        "rows": [],
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        local = build_model(Path(tmp), args.hidden, args.layers, args.vocab, device)
        precision = decide_precision(
            "auto",
            weight_bytes=local.weight_bytes,
            threshold_bytes=1 << 40,
            device=device,
            config=local.config(),
            bnb_available=bitsandbytes_available(),
            bf16_supported=device == "cuda" and torch.cuda.is_bf16_supported(),
            cpu_bf16=bf16_cpu_feature() if device == "cpu" else None,
        )
        runner = load(local, precision, device, max(levels))
        model = runner._hf_model
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        devices = sorted({p.device.type for p in model.parameters()})
        results["load"] = {
            "decision": precision.mode,
            "reason": precision.reason,
            "dtypes": dtypes,
            "devices": devices,
            "parameters": model.num_parameters(),
        }
        print(
            f"Loaded {model.num_parameters() / 1e6:.0f}M parameters as {precision.mode} ({precision.reason}): "
            f"tensors {dtypes} on {devices}",
            flush=True,
        )
        if device == "cuda":
            assert precision.mode == "bf16" and dtypes == ["torch.bfloat16"] and devices == ["cuda"], results["load"]

        runner_rate(runner, 2, 4)  # warm up both paths (kernels, allocator)
        generate_rate(model, runner.tokenizer, device, 2, 4)
        for streams in levels:
            ours = max(runner_rate(runner, streams, args.max_tokens) for _ in range(args.repeats))
            theirs = max(
                generate_rate(model, runner.tokenizer, device, streams, args.max_tokens) for _ in range(args.repeats)
            )
            results["rows"].append({"streams": streams, "runner_tok_s": ours, "generate_tok_s": theirs})
            print(
                f"  {streams} streams: runner {ours:.0f} tok/s, generate {theirs:.0f} tok/s "
                f"({time.perf_counter() - began:.0f}s so far)",
                flush=True,
            )

        bandwidth = copy_bandwidth(device, 256 if args.quick else 2048)
        per_token = bytes_per_token(model)
        results["bandwidth"] = {
            "copy_bytes_per_s": bandwidth,
            "weight_bytes_per_token": per_token,
            "limit_tok_s": bandwidth / per_token,
        }
        runner.unload()
        del model, runner
        gc.collect()
        if bitsandbytes_available():
            try:
                results["nf4"] = check_nf4(local, device, args.max_tokens)
            except Exception as exc:
                results["nf4"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            results["nf4"] = {"error": "bitsandbytes is not installed"}
    results["seconds"] = time.perf_counter() - began
    # What the GPU machine lacks: none of it may be needed here.
    results["service_modules_imported"] = sorted(m for m in _SERVICE_PACKAGES if m in sys.modules)
    print()
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def markdown(results: dict[str, Any]) -> str:
    load, bw = results["load"], results["bandwidth"]
    lines = [
        f"Device: {results['device']}, torch {results['torch']}. Random Llama, "
        f"{load['parameters'] / 1e6:.0f}M parameters, loaded as {load['decision']} ({load['reason']}); "
        f"{results['max_tokens']} tokens per stream, `ignore_eos`, greedy; best of the runs.",
        "",
        "| streams | server's runner tok/s | transformers `generate` tok/s | runner ÷ generate |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['streams']} | {r['runner_tok_s']:.0f} | {r['generate_tok_s']:.0f} | "
        f"{r['runner_tok_s'] / r['generate_tok_s']:.2f}× |"
        for r in results["rows"]
    ]
    limit = bw["limit_tok_s"]
    lines += [
        "",
        f"Memory bandwidth (device-to-device copy): {bw['copy_bytes_per_s'] / 1e9:.0f} GB/s; weights read "
        f"per token: {bw['weight_bytes_per_token'] / 1e6:.0f} MB; batch-1 limit {limit:.0f} tok/s.",
    ]
    first = next((r for r in results["rows"] if r["streams"] == 1), None)
    if first:
        lines.append(
            f"Batch-1 decode: runner {first['runner_tok_s'] / limit:.1%} of the bandwidth limit, "
            f"`generate` {first['generate_tok_s'] / limit:.1%}."
        )
    nf4 = results["nf4"]
    lines.append(
        f"nf4: {nf4['error']}"
        if "error" in nf4
        else f"nf4: loaded as {nf4['mode']}, {nf4['linear4bit_layers']} Linear4bit layers, "
        f"{nf4['memory_mib']:.0f} MiB, {nf4['tok_s_1_stream']:.0f} tok/s at one stream."
    )
    lines.append(
        f"Whole check: {results['seconds']:.0f} s; service packages imported: "
        f"{', '.join(results['service_modules_imported']) or 'none'}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
