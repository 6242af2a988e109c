"""The one interface every engine implements, and the request/chunk types that cross it."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from runners.local_cache import LocalModel
from runners.quantization import Precision

if TYPE_CHECKING:
    from runners.names import ModelRef

FinishReason = Literal["stop", "length", "cancelled"]


class AdapterRefused(Exception):
    """The engine cannot serve this adapter; the reason says why (PEFT on transformers serves it)."""


@dataclass(frozen=True)
class Adapter:
    """A pulled LoRA adapter and the base model it adapts."""

    local: LocalModel  # the adapter's own snapshot
    base: ModelRef
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.local.ref.name

    @property
    def rank(self) -> int:
        return max([int(self.config.get("r") or 0), *(self.config.get("rank_pattern") or {}).values()])


# OpenAI's tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
ToolChoice = str | dict[str, Any]


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
    # The fields above that the request left out, filled with the dialect's defaults: a preset's
    # parameters replace these (runners/presets.py), never a value the request set.
    defaulted: frozenset[str] = frozenset()


def left_out(**given: object) -> frozenset[str]:
    """The SamplingOptions fields a request left to the dialect's defaults: all of them but those
    given here with a value (None: not in the request)."""
    fields = {f.name for f in dataclasses.fields(SamplingOptions)} - {"defaulted"}
    return frozenset(fields - {name for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the output: any JSON object ("json"), JSON matching `schema` ("json_schema"),
    or an xgrammar structural tag (`structural_tag`, JSON text: how forced tool calls are enforced).

    Ollama's `format`, OpenAI's `response_format` and forced tool choices map here; runners enforce
    it while decoding.
    """

    kind: Literal["json", "json_schema", "structural_tag"]
    schema: dict[str, Any] | None = None
    structural_tag: str | None = None


@dataclass
class GenerationRequest:
    """Either chat `messages` (rendered with the model's template) or a raw `prompt` used as-is.

    Messages are in the shape Hugging Face chat templates take: `role`, `content`, and on assistant
    turns `tool_calls` ([{type, function: {name, arguments: dict}}]) and `reasoning_content`; tool
    results carry `tool_call_id` and/or `name`.
    """

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None  # with messages too: the text to use when the model has no chat template
    suffix: str | None = None  # fill-in-the-middle: generate what goes between prompt and suffix
    options: SamplingOptions = field(default_factory=SamplingOptions)
    response_format: ResponseFormat | None = None
    logprobs: int | None = None  # None: none; n >= 0: each token's logprob and its n most likely alternatives
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools: [{type: "function", function: {...}}]
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. enable_thinking, reasoning_effort
    require_thinking: bool = False  # Ollama's `think`: a model that cannot think is a 400
    # Chat only: drop the oldest turns to fit the context (Ollama) instead of refusing (OpenAI, vLLM)
    fit_context: bool = False
    context_limit: int | None = None  # Ollama's num_ctx: a smaller context than the model's
    chat_template: str | None = None  # a preset's Jinja chat template, used instead of the model's


@dataclass
class PreparedPrompt:
    """What every engine decodes from: the rendered prompt, its token ids and the output budget.

    Built once per request by runners/prepare.py, whatever the engine.
    """

    request: GenerationRequest
    text: str
    token_ids: list[int]
    max_new_tokens: int
    skip_special_tokens: bool = True  # False when the output parser needs marker tokens kept
    # The processor's inputs besides the token ids (pixel_values, image sizes, ...): images, for the prefill
    model_inputs: dict[str, Any] = field(default_factory=dict)


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
    token_ids: list[int] = field(default_factory=list)  # the tokens this chunk's text came from
    stop_sequence: str | None = None  # on the last chunk: the client's stop sequence that ended it


@dataclass
class ToolCallDelta:
    """A piece of a tool call as it streams (vLLM's shape): the first piece of call `index` has its
    `id` and `name`; later pieces add to `arguments` (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def arguments_object(self) -> Any:
        """The arguments as a value (Ollama's shape); the raw text if it is not valid JSON."""
        import json

        try:
            return json.loads(self.arguments or "{}")
        except ValueError:
            return self.arguments


@dataclass
class OutputDelta:
    """A parsed piece of output: answer text, reasoning text and tool-call pieces, apart."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    chunk: Chunk | None = None  # the engine's chunk it came from (finish reason, counts, logprobs)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.chunk.finish_reason if self.chunk else None

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.chunk.logprobs if self.chunk else None


class Runner(ABC):
    """A loaded model on one engine. Concurrent `generate` calls must all make progress."""

    backend: ClassVar[str]

    def __init__(self, model: LocalModel, precision: Precision, device: str) -> None:
        self.model = model
        self.precision = precision
        self.device = device
        self.adapters: dict[str, Adapter] = {}  # LoRA adapters attached, by name (runners/adapters.py)

    tokenizer: Any
    processor: Any = None  # a vision model's processor (images → tokens and pixel inputs); None: text only
    context_length: int  # the most tokens (prompt + output) one sequence can hold

    @abstractmethod
    def generate(self, prepared: PreparedPrompt, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """Stream the completion of a prepared prompt, with the attached LoRA `adapter` (by name)
        applied when one is given; closing the iterator early cancels it."""

    async def attach_adapter(self, adapter: Adapter) -> None:
        """Make `adapter` available to `generate` (once; later calls return at once). Raises
        AdapterRefused when this engine cannot serve it."""
        raise AdapterRefused(f"the {self.backend} engine does not serve LoRA adapters")

    @abstractmethod
    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One L2-normalized vector per input, from its token ids (prepared by runners/prepare.py,
        which fits them to the context)."""

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
