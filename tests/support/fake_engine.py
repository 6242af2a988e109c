"""A fake engine for the pool's unit tests: a `FakeRunner` and a `FakeLoader` the pool takes in
place of the real one (runners/loader.py).

Mocked because what they stand for cannot exist in a test that must run in seconds: loading a
model needs weights and seconds to minutes per load. The pool's policy (eviction, keep-alive,
cooldown, single-flight loads, admission) does not depend on what a runner computes, only on its
memory, its unload and its load succeeding or failing; the real engines are tested through the
server (tests/test_model_pool.py and others).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runners.backend import BackendChoice
from runners.base import Chunk, PreparedPrompt, Runner
from runners.loader import LoadPlan
from runners.local_cache import LocalModel
from runners.names import ModelRef
from runners.output_parsing import ParserChoice
from runners.quantization import Precision, QuantizeRequest


class FakeRunner(Runner):
    """A loaded model that takes `memory` bytes and records its unload."""

    backend = "fake"

    def __init__(self, model: LocalModel, precision: Precision, device: str, memory: int) -> None:
        super().__init__(model, precision, device)
        self.tokenizer = None
        self.context_length = 2048
        self.memory = memory
        self.running = 0  # what batch_size() reports
        self.unloaded = threading.Event()

    async def generate(self, prepared: PreparedPrompt) -> AsyncIterator[Chunk]:
        yield Chunk("", finish_reason="stop", prompt_tokens=len(prepared.token_ids))

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        return [[1.0] for _ in token_ids]

    def batch_size(self) -> int:
        return self.running

    def queue_depth(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return self.memory

    def unload(self) -> None:
        self.unloaded.set()


@dataclass
class FakeLoader:
    """Models by name with the memory each takes; `broken` ones fail to load. `gate`, when given,
    holds every load until it is set (to make requests arrive while a load runs)."""

    models: dict[str, int]
    backend: Literal["vllm", "transformers"] = "transformers"  # vllm: the pool embeds beside it
    broken: set[str] = field(default_factory=set)
    gate: threading.Event | None = None
    device: str = "cpu"
    loads: list[str] = field(default_factory=list)  # names, in the order their loads started
    runners: dict[str, list[FakeRunner]] = field(default_factory=dict)  # every runner loaded, by name
    loading: threading.Event = field(default_factory=threading.Event)  # set once a load has started

    def find(self, ref: ModelRef) -> LocalModel | None:
        if ref.name not in self.models:
            return None
        size = self.models[ref.name]
        return LocalModel(ref, "0" * 40, Path("/nonexistent") / ref.repo_id, size, size, time.time())

    def plan(self, local: LocalModel, quantize: QuantizeRequest) -> LoadPlan:
        return LoadPlan(
            trust_remote_code=False,
            precision=Precision("fp32", "fake"),
            backend=BackendChoice(self.backend, "fake engine"),
            estimate_bytes=local.weight_bytes,
            parsers=ParserChoice(None, None, "fake"),
        )

    def load(self, local: LocalModel, plan: LoadPlan) -> FakeRunner:
        name = local.ref.name
        self.loads.append(name)
        self.loading.set()
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        if name in self.broken:
            raise RuntimeError("the weights are corrupt")
        runner = FakeRunner(local, plan.precision, self.device, self.models[name])
        self.runners.setdefault(name, []).append(runner)
        return runner
