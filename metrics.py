"""Prometheus metrics, served on BentoML's own `/metrics` beside BentoML's request metrics.

Names follow vLLM's (time_to_first_token_seconds, num_requests_running, ...) so existing
dashboards read them. prometheus_client is imported on first use, inside the serving worker:
BentoML sets PROMETHEUS_MULTIPROC_DIR there only after importing the service module, and a client
imported earlier would not write where /metrics reads. (`bentoml.metrics` is only that deferred
import, deprecated in BentoML 1.4 in favour of prometheus_client.) Every series is recorded once
per request or per model event, never in the per-token loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # records only: metrics depends on no part of the runtime that records to it
    from runners.records import GenerationStats, ModelSnapshot

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


@dataclass(frozen=True)
class _Series:
    requests: Any
    ttft: Any
    inter_token: Any
    e2e: Any
    prompt_tokens: Any
    generation_tokens: Any
    running: Any
    waiting: Any
    loaded: Any
    load_time: Any


@lru_cache(maxsize=1)
def _series() -> _Series:
    """Created once per process (a second registration of a name is an error)."""
    from prometheus_client import Counter, Gauge, Histogram

    model = ["model"]
    return _Series(
        requests=Counter("requests", "HTTP requests by route template and status", ["endpoint", "method", "status"]),
        ttft=Histogram(
            "time_to_first_token_seconds", "Time from request to first output token", model, buckets=_LATENCY_BUCKETS
        ),
        inter_token=Histogram(
            "inter_token_latency_seconds",
            "Mean time between output tokens of a request",
            model,
            buckets=_TOKEN_GAP_BUCKETS,
        ),
        e2e=Histogram(
            "e2e_request_latency_seconds", "Time from request to last output token", model, buckets=_LATENCY_BUCKETS
        ),
        prompt_tokens=Counter("prompt_tokens", "Prompt tokens processed", model),
        generation_tokens=Counter("generation_tokens", "Output tokens generated", model),
        running=Gauge(
            "num_requests_running", "Requests decoding in a model's batch", model, multiprocess_mode="livesum"
        ),
        waiting=Gauge(
            "num_requests_waiting", "Requests queued for a place in a model's batch", model, multiprocess_mode="livesum"
        ),
        loaded=Gauge("models_loaded", "Models loaded in memory", multiprocess_mode="livesum"),
        load_time=Histogram("model_load_seconds", "Time to load a model", ["model", "backend"], buckets=_LOAD_BUCKETS),
    )


def record_generation(model: str, stats: GenerationStats) -> None:
    """One finished generation: latencies and token counts."""
    series = _series()
    series.ttft.labels(model).observe((stats.load_duration_ns + stats.prompt_eval_duration_ns) / 1e9)
    series.e2e.labels(model).observe(stats.total_duration_ns / 1e9)
    if stats.completion_tokens > 1:
        series.inter_token.labels(model).observe(stats.eval_duration_ns / 1e9 / (stats.completion_tokens - 1))
    series.prompt_tokens.labels(model).inc(stats.prompt_tokens)
    series.generation_tokens.labels(model).inc(stats.completion_tokens)


def record_load(model: str, backend: str, seconds: float) -> None:
    _series().load_time.labels(model, backend).observe(seconds)


def sample_pool(loaded: list[ModelSnapshot], previous: set[str]) -> set[str]:
    """Refresh the gauges from the pool's snapshot (the server takes one every second); returns the
    models sampled, so a model unloaded since the last sample is set back to zero."""
    series = _series()
    series.loaded.set(len(loaded))
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    for model in loaded:  # a model's embedding runner counts under the model's name
        running[model.name] = running.get(model.name, 0) + model.running
        waiting[model.name] = waiting.get(model.name, 0) + model.waiting
    names = set(running)
    for name in names:
        series.running.labels(name).set(running[name])
        series.waiting.labels(name).set(waiting[name])
    for gone in previous - names:
        series.running.labels(gone).set(0)
        series.waiting.labels(gone).set(0)
    return names


def record_request(endpoint: str, method: str, status: int) -> None:
    _series().requests.labels(endpoint, method, str(status)).inc()
