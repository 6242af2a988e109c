"""How the pool finds, plans and loads a model: the mechanics under its policy.

The pool (runners/pool.py) decides *when* to load, evict and refuse; a `ModelLoader` does the work:
find the complete local snapshot, plan the load (trust, precision, engine, memory estimate, output
parsers) and load the runner. `EngineLoader` is the real one; tests give the pool a fake loader
to exercise its policy without model weights (tests/unit/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from errors import ModelNotAllowed
from runners.backend import BackendChoice, choose_backend, load_runner
from runners.base import Runner
from runners.local_cache import LocalModel, find_local
from runners.model_info import describe
from runners.names import ModelRef
from runners.output_parsing import ParserChoice, choose_parsers
from runners.quantization import (
    Precision,
    QuantizeRequest,
    bf16_cpu_feature,
    bitsandbytes_available,
    checkpoint_dtype,
    decide_precision,
)
from settings import Settings

_CHECKPOINT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_TARGET_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "nf4": 0.5}


@dataclass(frozen=True)
class LoadPlan:
    """What a load will be: decided before any memory is taken, so the pool can make room first."""

    trust_remote_code: bool
    precision: Precision
    backend: BackendChoice
    estimate_bytes: int  # the memory the load will take, estimated from the checkpoint
    parsers: ParserChoice  # how its output is split into answer, reasoning and tool calls


class ModelLoader(Protocol):
    """Blocking calls (the pool runs them in threads)."""

    device: str  # where models load: "cpu" or "cuda"

    def find(self, ref: ModelRef) -> LocalModel | None:
        """The complete local snapshot of `ref`, or None when it is not pulled (never downloads)."""

    def plan(self, local: LocalModel, quantize: QuantizeRequest) -> LoadPlan:
        """How `local` would load; ModelNotAllowed, InvalidRequest when it may not."""

    def load(self, local: LocalModel, plan: LoadPlan) -> Runner:
        """Load it (seconds to minutes)."""


def resolve_device(setting: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise RuntimeError("DEVICE=cuda, but CUDA is not available to torch")
    return "cuda" if setting == "cuda" or (setting == "auto" and cuda) else "cpu"


class EngineLoader:
    """The real loader: the local Hugging Face cache, the quantization policy, the two engines."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)

    def find(self, ref: ModelRef) -> LocalModel | None:
        return find_local(ref)

    def plan(self, local: LocalModel, quantize: QuantizeRequest) -> LoadPlan:
        config = local.config()
        trust = self._trust_remote_code(local, config)
        import torch

        precision = decide_precision(
            quantize,
            weight_bytes=local.weight_bytes,
            threshold_bytes=self.settings.model_q4_threshold_bytes,
            device=self.device,
            config=config,
            bnb_available=bitsandbytes_available(),
            bf16_supported=self.device == "cuda" and torch.cuda.is_bf16_supported(),
            cpu_bf16=bf16_cpu_feature() if self.device == "cpu" else None,
        )
        # The first decision imports vLLM (seconds): one more reason the pool calls this in a thread.
        backend = choose_backend(self.settings.backend, device=self.device, config=config, precision=precision)
        return LoadPlan(
            trust_remote_code=trust,
            precision=precision,
            backend=backend,
            estimate_bytes=estimate_bytes(local.weight_bytes, precision.mode, config),
            parsers=choose_parsers(local.ref.repo_id, describe(local), self.settings),
        )

    def load(self, local: LocalModel, plan: LoadPlan) -> Runner:
        return load_runner(plan.backend, local, plan.precision, self.device, plan.trust_remote_code, self.settings)

    def _trust_remote_code(self, local: LocalModel, config: dict) -> bool:
        if not config.get("auto_map"):
            return False
        if local.ref.repo_id in self.settings.trust_remote_code_models:
            return True
        raise ModelNotAllowed(
            f"model '{local.ref.repo_id}' needs trust_remote_code (it ships its own code); "
            "add it to TRUST_REMOTE_CODE_MODELS to allow it"
        )


def estimate_bytes(weight_bytes: int, mode: str, config: dict) -> int:
    """Memory a load will take, from the checkpoint size and the target precision."""
    params = weight_bytes / _CHECKPOINT_BYTES.get(checkpoint_dtype(config), 4)
    return int(params * _TARGET_BYTES.get(mode, 0) or weight_bytes)
