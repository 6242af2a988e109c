"""The one interface every engine implements, and the request/chunk types that cross it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from runners.local_cache import LocalModel
from runners.quantization import Precision

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class SamplingOptions:
    """Sampling settings shared by every dialect (Ollama `options`, OpenAI fields, native /chat)."""

    max_tokens: int | None = 512  # None: until the model's context is full (vLLM's OpenAI default)
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # fixed-length outputs for benchmarks and tests


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the output: any JSON object ("json"), or JSON matching `schema` ("json_schema").

    Ollama's `format` and OpenAI's `response_format` both map here; runners enforce it while decoding.
    """

    kind: Literal["json", "json_schema"]
    schema: dict[str, Any] | None = None


@dataclass
class GenerationRequest:
    """Either chat `messages` (rendered with the model's template) or a raw `prompt` used as-is."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None  # with messages too: the text to use when the model has no chat template
    suffix: str | None = None  # fill-in-the-middle: generate what goes between prompt and suffix
    options: SamplingOptions = field(default_factory=SamplingOptions)
    response_format: ResponseFormat | None = None
    logprobs: int | None = None  # None: none; n >= 0: each token's logprob and its n most likely alternatives


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and (if asked) the most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of generated text. The last chunk of a stream carries `finish_reason` and counts.

    `logprobs` (only when the request asked) covers the tokens generated since the previous chunk.
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


class Runner(ABC):
    """A loaded model on one engine. Concurrent `generate` calls must all make progress."""

    backend: ClassVar[str]

    def __init__(self, model: LocalModel, precision: Precision, device: str) -> None:
        self.model = model
        self.precision = precision
        self.device = device

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the completion; closing the iterator early cancels the request."""

    @abstractmethod
    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        """One L2-normalized vector per text, and the number of tokens the texts made up. A text
        longer than the context is cut to fit when `truncate`, else refused (400)."""

    @abstractmethod
    def batch_size(self) -> int:
        """Requests decoding right now (the running batch)."""

    @abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting for a place in the batch."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Memory the loaded model occupies (weights and buffers), measured, not estimated."""

    @abstractmethod
    def unload(self) -> None:
        """Free everything the model holds (blocking; the pool runs it in a thread)."""
