"""One generation, whatever the dialect: lease the model, prepare the prompt, stream the parsed
output, time and count it.

Every endpoint (native /chat, Ollama /api/*, OpenAI /v1/*) starts a Generation and only formats
what it yields (answer text, reasoning and tool calls apart), so prompt preparation, output
parsing, errors, timings and token counts are written once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timezone

import metrics
from runners.base import GenerationRequest, OutputDelta, PreparedPrompt, TokenLogprob, ToolCall
from runners.images import decode_request_images, has_images
from runners.output_parsing import OutputParser, merge_tool_calls
from runners.pool import DEFAULT, KeepAlive, Lease, ModelPool
from runners.prepare import prepare_prompt
from runners.presets import PresetLookup, apply_preset, resolve
from runners.records import GenerationStats

__all__ = ["Completion", "Generation", "GenerationGroup", "GenerationStats", "start_generation", "start_generations"]


@dataclass
class Completion:
    """One finished generation: its answer, reasoning, tool calls, per-token logprobs if asked, stats."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob] | None
    stats: GenerationStats


class Generation:
    """A started generation. Errors that prevent it (unknown model, failed load, a prompt that does
    not fit, tools the model cannot call) were raised by `start_generation`, before any response
    byte, so they get a proper status code."""

    def __init__(
        self, model: str, lease: Lease, prepared: PreparedPrompt, parser: OutputParser, started_ns: int
    ) -> None:
        self.model = model
        self.created_at = datetime.now(timezone.utc)
        self.request = prepared.request
        self.prepared = prepared
        self.parser = parser
        self._lease = lease
        self._started_ns = started_ns
        self.stats: GenerationStats | None = None

    @property
    def named_tool(self) -> str | None:
        """The function a named tool_choice forced, if any."""
        return self.parser.named_tool

    async def stream(self) -> AsyncGenerator[OutputDelta, None]:
        """Parsed pieces of output (the last one carries the finish reason and counts); releases
        the model at the end."""
        generate_started = time.perf_counter_ns()
        first_token_ns: int | None = None
        try:
            async for chunk in self._lease.runner.generate(self.prepared):
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
                        stop_sequence=chunk.stop_sequence,
                    )
                    metrics.record_generation(self._lease.entry.name, self.stats)
                yield self.parser.feed(chunk)
        finally:
            await self.close()

    async def collect(self) -> Completion:
        """Run to the end (for non-streaming responses): the same parsing as a stream, gathered."""
        return gather([delta async for delta in self.stream()], self)

    async def close(self) -> None:
        """Release the model; safe to call more than once (responses call it on disconnect too)."""
        await self._lease.release()


def gather(deltas: list[OutputDelta], generation: Generation) -> Completion:
    logprobs: list[TokenLogprob] | None = [] if generation.request.logprobs is not None else None
    for delta in deltas:
        if logprobs is not None and delta.logprobs:
            logprobs.extend(delta.logprobs)
    assert generation.stats is not None
    return Completion(
        text="".join(d.content for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        tool_calls=merge_tool_calls([call for d in deltas for call in d.tool_calls]),
        logprobs=logprobs,
        stats=generation.stats,
    )


async def start_generation(
    pool: ModelPool,
    model: str,
    request: GenerationRequest,
    *,
    keep_alive: KeepAlive = DEFAULT,
    presets: PresetLookup | None = None,
) -> Generation:
    """Start generating for `request` with `model`: a pulled model, or a preset found in `presets`
    (its settings are added to the request here, whatever the dialect)."""
    started = time.perf_counter_ns()
    served = await resolve(presets, model)
    if served.preset is not None:
        request = apply_preset(served.preset, request)
    if has_images(request):  # a bad image is refused before any model loads
        request = await asyncio.to_thread(decode_request_images, request, pool.settings)
    lease = await pool.acquire(served.name, quantize=served.quantize, keep_alive=keep_alive, files=served.files)
    try:
        prepared, parser = await asyncio.to_thread(_prepare, model, lease, request)
    except BaseException:
        await lease.release()
        raise
    return Generation(model, lease, prepared, parser, started)


def _prepare(model: str, lease: Lease, request: GenerationRequest) -> tuple[PreparedPrompt, OutputParser]:
    """The output parser (which may force a tool call through an output constraint), then the
    prompt (blocking: templates, tokenizers and the first vLLM parser import are CPU work)."""
    runner = lease.runner
    parser = OutputParser(model, lease.entry.parsers, runner.tokenizer, request)
    if parser.constraint is not None:
        request = dataclasses.replace(request, response_format=parser.constraint)
    prepared = prepare_prompt(runner.tokenizer, request, runner.context_length, runner.processor)
    prepared.skip_special_tokens = parser.skip_special_tokens
    parser.set_prompt(prepared.token_ids)
    return prepared, parser


class GenerationGroup:
    """Several generations answering one request (OpenAI's `n`, a list of prompts), decoding
    concurrently, each on its own lease, streamed as one sequence of (index, chunk)."""

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations
        self.created_at = generations[0].created_at
        self._pumps: list[asyncio.Task[None]] = []

    async def stream(self) -> AsyncGenerator[tuple[int, OutputDelta], None]:
        """Parsed pieces in arrival order; each generation's own pieces stay in order."""
        # Bounded: a slow reader holds the pumps back, and the engines merge what waits for them.
        queue: asyncio.Queue[tuple[int, OutputDelta | Exception | None]] = asyncio.Queue(maxsize=len(self.generations))

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for chunk in generation.stream():
                    await queue.put((index, chunk))
            except Exception as exc:
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
        deltas: list[list[OutputDelta]] = [[] for _ in self.generations]
        async for index, delta in self.stream():
            deltas[index].append(delta)
        return [gather(pieces, generation) for pieces, generation in zip(deltas, self.generations, strict=True)]

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
    pool: ModelPool,
    model: str,
    requests: list[GenerationRequest],
    *,
    keep_alive: KeepAlive = DEFAULT,
    presets: PresetLookup | None = None,
) -> GenerationGroup:
    """Start one generation per request, together; if any cannot start, none is left holding a lease."""
    tasks = [
        asyncio.create_task(start_generation(pool, model, r, keep_alive=keep_alive, presets=presets)) for r in requests
    ]
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
