"""Read-only records the runtime publishes to its readers (the API, metrics): a snapshot of each
loaded model, taken by the pool, and the statistics of a finished generation.

Readers get these instead of the pool's entries or the runners themselves (as Ollama's /api/ps
reads only what its scheduler records), so no endpoint depends on an engine's attributes. This
module imports no other part of the runtime: metrics can name these types without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from runners.base import FinishReason
    from runners.local_cache import LocalModel
    from runners.output_parsing import ParserChoice

# "embed": a transformers runner that embeds for a model whose generation runner cannot.
Purpose = Literal["generate", "embed"]


@dataclass(frozen=True)
class ModelSnapshot:
    """One loaded model (or a model's embedding runner) as the pool saw it at one moment."""

    name: str  # the model's name; an embedding runner's is its model's
    purpose: Purpose
    local: LocalModel  # the snapshot in the local cache it was loaded from
    backend: str  # "transformers" | "vllm"
    backend_reason: str
    precision: str  # the mode it runs in: fp32, bf16, fp16, nf4, prequantized
    precision_reason: str
    device: str  # "cpu" | "cuda"
    context_length: int  # the most tokens (prompt + output) one sequence can hold
    parsers: ParserChoice
    memory_bytes: int
    load_duration_ns: int
    leases: int  # requests holding the model (admitted), whatever their stage
    running: int  # requests decoding in the engine's current batch
    waiting: int  # requests queued in the engine for a batch slot
    keep_alive: float | None  # seconds it stays loaded once idle; None: forever
    last_used: float  # epoch seconds
    expires_at: float | None  # epoch seconds; None while in use or kept forever
    adapters: tuple[LocalModel, ...] = ()  # LoRA adapters attached to it (served over it), by name


@dataclass
class GenerationStats:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    load_duration_ns: int
    prompt_eval_duration_ns: int  # until the first token
    eval_duration_ns: int  # first token to the end
    total_duration_ns: int
    stop_sequence: str | None = None  # the client's stop sequence that ended the output, if one did
