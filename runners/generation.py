"""One generation, whatever the dialect: lease the model, stream chunks, time and count them.

Every endpoint (native /chat, Ollama /api/*, OpenAI /v1/*) starts a Generation and only formats
what it yields, so errors, timings and token counts are written once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

from runners.base import Chunk, FinishReason, GenerationRequest
from runners.pool import DEFAULT, KeepAlive, Lease, ModelPool


@dataclass
class GenerationStats:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    load_duration_ns: int
    prompt_eval_duration_ns: int  # until the first token
    eval_duration_ns: int  # first token to the end
    total_duration_ns: int


class Generation:
    """A started generation. Errors that prevent it (unknown model, failed load) were raised by
    `start_generation`, before any response byte, so they get a proper status code."""

    def __init__(self, model: str, lease: Lease, request: GenerationRequest, started_ns: int) -> None:
        self.model = model
        self.created_at = datetime.now(timezone.utc)
        self.request = request
        self._lease = lease
        self._started_ns = started_ns
        self.stats: GenerationStats | None = None

    @property
    def runner(self):  # noqa: ANN201 - the runner type depends on the backend
        return self._lease.runner

    async def stream(self) -> AsyncIterator[Chunk]:
        """Yield chunks (the last one has finish_reason and counts); releases the model at the end."""
        generate_started = time.perf_counter_ns()
        first_token_ns: int | None = None
        try:
            async for chunk in self._lease.runner.generate(self.request):
                now = time.perf_counter_ns()
                if first_token_ns is None and (chunk.text or chunk.finish_reason):
                    first_token_ns = now
                if chunk.finish_reason is not None:
                    self.stats = GenerationStats(
                        finish_reason=chunk.finish_reason,
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens,
                        load_duration_ns=self._lease.load_duration_ns,
                        prompt_eval_duration_ns=(first_token_ns or now) - generate_started,
                        eval_duration_ns=now - (first_token_ns or now),
                        total_duration_ns=now - self._started_ns,
                    )
                yield chunk
        finally:
            await self.close()

    async def collect(self) -> tuple[str, GenerationStats]:
        """Run to the end and return the whole text (for non-streaming responses)."""
        parts = [chunk.text async for chunk in self.stream()]
        assert self.stats is not None
        return "".join(parts), self.stats

    async def close(self) -> None:
        """Release the model; safe to call more than once (responses call it on disconnect too)."""
        await self._lease.release()


async def start_generation(
    pool: ModelPool, model: str, request: GenerationRequest, *, keep_alive: KeepAlive = DEFAULT
) -> Generation:
    started = time.perf_counter_ns()
    lease = await pool.acquire(model, keep_alive=keep_alive)
    return Generation(model, lease, request, started)
