"""Embeddings, whatever the dialect: lease the model, embed, release, time it.

Ollama's /api/embed and OpenAI's /v1/embeddings both call `embed` and only format the result.
The pool hands out a runner that can embed whichever engine generates with the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from runners.pool import DEFAULT, KeepAlive, ModelPool
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
        vectors, tokens = await lease.runner.embed(texts, truncate)
    finally:
        await lease.release()
    return Embeddings(vectors, tokens, lease.load_duration_ns, time.perf_counter_ns() - started)
