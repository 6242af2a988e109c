"""One generation, whatever the dialect: lease the model, stream chunks, time and count them.

Every endpoint (native /chat, Ollama /api/*, OpenAI /v1/*) starts a Generation and only formats
what it yields, so errors, timings and token counts are written once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

import metrics
from runners.base import Chunk, FinishReason, GenerationRequest, TokenLogprob
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
                    metrics.record_generation(self._lease.entry.name, self.stats)
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


@dataclass
class Completion:
    """One finished generation of a group: its whole text, per-token logprobs if asked, and stats."""

    text: str
    logprobs: list[TokenLogprob] | None
    stats: GenerationStats


class GenerationGroup:
    """Several generations answering one request (OpenAI's `n`, a list of prompts), decoding
    concurrently, each on its own lease, streamed as one sequence of (index, chunk)."""

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations
        self.created_at = generations[0].created_at
        self._pumps: list[asyncio.Task[None]] = []

    async def stream(self) -> AsyncIterator[tuple[int, Chunk]]:
        """Chunks in arrival order; each generation's own chunks stay in order."""
        # Bounded: a slow reader holds the pumps back, and the engines merge what waits for them.
        queue: asyncio.Queue[tuple[int, Chunk | Exception | None]] = asyncio.Queue(maxsize=len(self.generations))

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for chunk in generation.stream():
                    await queue.put((index, chunk))
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
                await queue.put((index, exc))
            await queue.put((index, None))

        self._pumps = [asyncio.create_task(pump(i, g), name=f"generation-{i}") for i, g in enumerate(self.generations)]
        try:
            running = len(self._pumps)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            await self.close()

    async def collect(self) -> list[Completion]:
        """Run every generation to the end (for non-streaming responses)."""
        texts: list[list[str]] = [[] for _ in self.generations]
        logprobs = [[] if g.request.logprobs is not None else None for g in self.generations]
        async for index, chunk in self.stream():
            texts[index].append(chunk.text)
            if chunk.logprobs:
                logprobs[index].extend(chunk.logprobs)
        return [Completion("".join(parts), tokens, stats) for parts, tokens, stats in zip(texts, logprobs, self.stats())]

    def stats(self) -> list[GenerationStats]:
        """Each generation's statistics, once all have finished."""
        finished = [g.stats for g in self.generations if g.stats is not None]
        assert len(finished) == len(self.generations), "a generation has not finished"
        return finished

    async def close(self) -> None:
        """Stop every generation still running and release every lease; safe to call again."""
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for generation in self.generations:
            await generation.close()


async def start_generations(
    pool: ModelPool, model: str, requests: list[GenerationRequest], *, keep_alive: KeepAlive = DEFAULT
) -> GenerationGroup:
    """Start one generation per request, together; if any cannot start, none is left holding a lease."""
    tasks = [asyncio.create_task(start_generation(pool, model, r, keep_alive=keep_alive)) for r in requests]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result().close()
        raise
    return GenerationGroup([task.result() for task in tasks])
