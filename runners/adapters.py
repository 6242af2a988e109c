"""LoRA adapters: PEFT adapter repositories pulled from the Hub and served over their base model.

An adapter repository holds `adapter_config.json` (whose `base_model_name_or_path` names the base)
and the adapter's weights; the base must be pulled too. A request for an adapter leases its base's
runner, so one copy of the base serves the base and all its adapters, and generates with the
adapter applied to that request only:
- on vLLM with vLLM's LoRA support: an engine starts with `enable_lora` when adapters of its model
  are pulled, and each request carries its LoRARequest, so requests for different adapters of one
  base share the base's batch (up to MAX_LORAS adapters in one batch, ranks up to MAX_LORA_RANK);
- on transformers with PEFT: the adapters load into one PeftModel around the base's weights and each
  sequence of the running batch names its adapter (PEFT's mixed-adapter batches).
An adapter vLLM refuses (a rank above MAX_LORA_RANK, DoRA, biases, modules_to_save, ...) is served
by PEFT on the transformers runner of the same weights that the pool keeps beside a vLLM model
(the one it embeds with). A base whose vLLM engine started before any of its adapters was pulled is
restarted once with LoRA enabled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from errors import InvalidModelName, InvalidRequest, ModelNotFound
from runners.base import Adapter, Chunk, PreparedPrompt, Runner
from runners.local_cache import ADAPTER_CONFIG, LocalModel, find_local, list_local
from runners.names import ModelRef, parse_model_name

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)


def read_adapter(local: LocalModel) -> Adapter:
    """The adapter in a pulled snapshot (InvalidRequest when it is not a LoRA adapter this server serves)."""
    config = json.loads((local.path / ADAPTER_CONFIG).read_text())
    return Adapter(local, base_of(config, local.ref.name), config)


def base_of(config: dict[str, Any], name: str) -> ModelRef:
    """The base model an adapter config names, checked: LoRA only, a Hub repo id."""
    peft_type = str(config.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise InvalidRequest(f"'{name}' is a PEFT {peft_type} adapter; only LoRA adapters are served", param="model")
    raw = config.get("base_model_name_or_path")
    if not raw:
        raise InvalidRequest(
            f"LoRA adapter '{name}' does not name its base model (base_model_name_or_path in {ADAPTER_CONFIG})",
            param="model",
        )
    try:
        return parse_model_name(raw)
    except InvalidModelName:
        raise InvalidRequest(
            f"LoRA adapter '{name}' names its base model {raw!r}, which is not a Hugging Face repo id "
            f"(set base_model_name_or_path in its {ADAPTER_CONFIG} to the base's repo id)",
            param="model",
        ) from None


def base_not_pulled(name: str, base: ModelRef) -> ModelNotFound:
    return ModelNotFound(
        f"'{name}' is a LoRA adapter of '{base.name}', which is not pulled: pull '{base.name}' first "
        f'(POST /pull or /api/pull with {{"model": "{base.name}"}})',
        param="model",
    )


def base_snapshot(adapter: Adapter) -> LocalModel:
    """The base's complete local snapshot (blocking); ModelNotFound naming the base when it is not pulled."""
    base = find_local(adapter.base)
    if base is None:
        raise base_not_pulled(adapter.name, adapter.base)
    if base.is_adapter:
        raise InvalidRequest(f"'{adapter.name}' names '{adapter.base.name}' as its base, which is itself an adapter")
    return base


def check_base_pulled(config: dict[str, Any], name: str) -> ModelRef:
    """For a pull, before the adapter's weights download: its base, which must be pulled already."""
    base = base_of(config, name)
    local = find_local(base)
    if local is None:
        raise base_not_pulled(name, base)
    if local.is_adapter:
        raise InvalidRequest(f"'{name}' names '{base.name}' as its base, which is itself an adapter")
    return base


def find_adapter(ref: ModelRef) -> Adapter | None:
    """The pulled adapter named `ref` (blocking); None when `ref` is not a pulled adapter."""
    local = find_local(ref)
    return read_adapter(local) if local is not None and local.is_adapter else None


def adapters_of(base: ModelRef) -> list[Adapter]:
    """The pulled adapters whose base is `base` (blocking: reads the cache)."""
    found = []
    for local in list_local():
        if local.is_adapter:
            try:
                adapter = read_adapter(local)
            except (InvalidRequest, ValueError, OSError):
                continue
            if adapter.base.repo_id == base.repo_id:
                found.append(adapter)
    return found


def vllm_refusal(adapter: Adapter, settings: Settings) -> str | None:
    """Why vLLM would refuse this adapter with these settings, asked of vLLM itself; None if it serves it."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        helper = PEFTHelper.from_local_dir(str(adapter.local.path), None)
        helper.validate_legal(LoRAConfig(max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


class AdapterRunner(Runner):
    """The base's runner seen through one adapter: generation applies the adapter, the rest is the base's."""

    def __init__(self, base: Runner, adapter: Adapter) -> None:
        super().__init__(adapter.local, base.precision, base.device)
        self.base_runner = base
        self.adapter = adapter
        self.backend = base.backend  # type: ignore[misc]
        self.tokenizer = base.tokenizer
        self.processor = base.processor
        self.context_length = base.context_length

    def generate(self, prepared: PreparedPrompt, adapter: str | None = None) -> AsyncIterator[Chunk]:
        return self.base_runner.generate(prepared, adapter=adapter or self.adapter.name)

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        raise InvalidRequest(f"'{self.adapter.name}' is a LoRA adapter: embed with its base '{self.adapter.base.name}'")

    def batch_size(self) -> int:
        return self.base_runner.batch_size()

    def queue_depth(self) -> int:
        return self.base_runner.queue_depth()

    def memory_bytes(self) -> int:
        return self.base_runner.memory_bytes()

    def unload(self) -> None:  # the base's runner is the pool's to unload
        pass


class AdapterServing:
    """The pool's index of adapters: a name resolved to an adapter (the pool leases its base and
    attaches it, ModelPool._lease_adapter)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._known: dict[str, Adapter] = {}  # adapters found in the cache, by name (forgotten on pull/delete)

    async def find(self, ref: ModelRef) -> Adapter | None:
        adapter = self._known.get(ref.name)
        if adapter is None:
            adapter = await asyncio.to_thread(find_adapter, ref)
            if adapter is not None:
                self._known[ref.name] = adapter
        return adapter

    def forget(self, name: str) -> None:
        self._known.pop(name, None)


def described_by(local: LocalModel) -> tuple[LocalModel | None, str]:
    """The snapshot whose files describe `local` (family, size, context, template): the model itself,
    or an adapter's base (None when the base is not pulled); and the parent model's name (an
    adapter's base; "" for a model). Blocking: reads the cache."""
    if not local.is_adapter:
        return local, ""
    try:
        adapter = read_adapter(local)
    except (InvalidRequest, ValueError, OSError):
        return None, ""
    return find_local(adapter.base), adapter.base.name
