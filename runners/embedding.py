"""Embeddings, whatever the dialect: lease the model, prepare the inputs, embed, release, time it.

Ollama's /api/embed and OpenAI's /v1/embeddings both call `embed` and only format the result.
The pool hands out a runner that can embed whichever engine generates with the model (and admits
the request like a generation); the inputs are tokenized and fitted by runners/prepare.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from runners.pool import DEFAULT, KeepAlive, ModelPool
from runners.prepare import prepare_embedding
from runners.presets import PresetLookup, resolve


@dataclass
class Embeddings:
    vectors: list[list[float]]  # one L2-normalized vector per input, in input order
    prompt_tokens: int
    load_duration_ns: int
    total_duration_ns: int


async def embed(
    pool: ModelPool,
    model: str,
    texts: list[str],
    *,
    truncate: bool = False,
    keep_alive: KeepAlive = DEFAULT,
    presets: PresetLookup | None = None,
) -> Embeddings:
    started = time.perf_counter_ns()
    served = await resolve(presets, model)  # a preset embeds with its model
    lease = await pool.acquire(
        served.name, quantize=served.quantize, keep_alive=keep_alive, purpose="embed", files=served.files
    )
    try:
        runner = lease.runner
        # Blocking (tokenizers are CPU work): in a thread.
        token_ids = await asyncio.to_thread(
            prepare_embedding, runner.tokenizer, texts, runner.context_length, truncate=truncate
        )
        vectors = await runner.embed(token_ids)
    finally:
        await lease.release()
    tokens = sum(len(ids) for ids in token_ids)
    return Embeddings(vectors, tokens, lease.load_duration_ns, time.perf_counter_ns() - started)
