"""The load generator: concurrent streaming requests over HTTP, timed per token as a client sees it."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass

import httpx

DIALECTS = ("openai", "ollama")  # streamed; "openai-json" is the non-streaming OpenAI completion


@dataclass
class RequestTiming:
    ttft: float  # seconds from sending the request to the first token
    token_gaps: list[float]  # seconds between consecutive streamed pieces
    tokens: int  # output tokens, as the server counted them


@dataclass
class LoadResult:
    """One round: `concurrency` requests sent at once."""

    concurrency: int
    wall: float
    client_cpu: float  # CPU seconds the load generator itself spent: on a small machine, taken from the server
    requests: list[RequestTiming]

    @property
    def tokens_per_second(self) -> float:
        return sum(r.tokens for r in self.requests) / self.wall

    @property
    def requests_per_second(self) -> float:
        return len(self.requests) / self.wall


def _request(dialect: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    """The request for `dialect` (streaming, or one JSON body for "openai-json"), with a fixed output
    length (ignore_eos)."""
    if dialect == "openai-json":
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
    if dialect == "openai":
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    return "/api/generate", {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "stream": True,
        "options": {"num_predict": max_tokens, "temperature": 0, "ignore_eos": True},
    }


def _parse(dialect: str, line: str) -> tuple[bool, int | None]:
    """(whether the line carries output text, the final token count if it has one)."""
    if dialect == "openai":
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False, None
        event = json.loads(line[6:])
        if event.get("usage"):
            return False, event["usage"]["completion_tokens"]
        return bool(event["choices"] and event["choices"][0].get("text")), None
    event = json.loads(line)
    return bool(event.get("response")), event.get("eval_count") if event.get("done") else None


async def _one(client: httpx.AsyncClient, dialect: str, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    path, body = _request(dialect, model, prompt, max_tokens)
    started = time.perf_counter()
    if not body.get("stream"):  # one JSON body: its arrival is the first (and every) token's
        response = await client.post(path, json=body)
        response.raise_for_status()
        return RequestTiming(time.perf_counter() - started, [], response.json()["usage"]["completion_tokens"])
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            has_text, count = _parse(dialect, line)
            if has_text:
                arrivals.append(time.perf_counter())
            if count is not None:
                tokens = count
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestTiming(arrivals[0] - started, gaps, tokens)


async def run_round(url: str, dialect: str, model: str, prompt: str, max_tokens: int, concurrency: int) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started, cpu = time.perf_counter(), time.process_time()
        timings = await asyncio.gather(*(_one(client, dialect, model, prompt, max_tokens) for _ in range(concurrency)))
        return LoadResult(concurrency, time.perf_counter() - started, time.process_time() - cpu, list(timings))


def versus_dialect(dialect: str) -> str:
    """The stream of vLLM's own server a round of `dialect` is paired with (vLLM has no Ollama API:
    the Ollama stream is paired with its OpenAI stream, the same tokens over the same kind of stream)."""
    return "openai" if dialect == "ollama" else dialect


def alternating_rounds(
    ours: str,
    theirs: str,
    dialect: str,
    level: int,
    rounds: int,
    *,
    model: str,
    prompt: str,
    max_tokens: int,
    settle: float,
) -> tuple[list[LoadResult], list[LoadResult]]:
    """`rounds` rounds each of this server (`dialect`) and of vLLM's own server (`versus_dialect`),
    alternating, which side goes first alternating too, so a machine that speeds up or slows down
    moves both alike; each round after `settle` seconds of quiet, so the other server's processes
    are idle again. Returns (ours, theirs), pair by pair."""
    mine: list[LoadResult] = []
    vllms: list[LoadResult] = []
    for i in range(rounds):
        sides = [(ours, dialect, mine), (theirs, versus_dialect(dialect), vllms)]
        for url, d, into in sides if i % 2 == 0 else sides[::-1]:
            time.sleep(settle)
            into.append(asyncio.run(run_round(url, d, model, prompt, max_tokens, level)))
    return mine, vllms


async def single_stream_ttfts(url: str, dialect: str, model: str, prompt: str, samples: int) -> list[float]:
    """Time to first token of `samples` requests sent one after another. Each asks for 2 tokens, so
    the first is delivered while the engine computes the next, as in any longer request."""
    return [(await run_round(url, dialect, model, prompt, 2, 1)).requests[0].ttft for _ in range(samples)]


def server_ttft(url: str) -> tuple[float, float]:
    """(sum in seconds, count) of the server's own time_to_first_token_seconds, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in family.samples
        if s.name.startswith("time_to_first_token_seconds")
    }
    return samples.get("time_to_first_token_seconds_sum", 0.0), samples.get("time_to_first_token_seconds_count", 0.0)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated; the one value for a single sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(rounds: list[LoadResult]) -> dict[str, float]:
    """Latency percentiles over every request of every round; throughput as the median round."""
    ttfts = [r.ttft for round_ in rounds for r in round_.requests]
    gaps = [g for round_ in rounds for r in round_.requests for g in r.token_gaps] or [0.0]
    return {
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "ttft_p95_ms": percentile(ttfts, 95) * 1000,
        "itl_p50_ms": percentile(gaps, 50) * 1000,
        "itl_p95_ms": percentile(gaps, 95) * 1000,
        "tokens_per_second": statistics.median(r.tokens_per_second for r in rounds),
        "requests_per_second": statistics.median(r.requests_per_second for r in rounds),
        "client_cpu_cores": statistics.median(r.client_cpu / r.wall for r in rounds),
    }
