"""The transformers engine: any causal LM transformers can load, on CUDA or CPU, and vision models
(image-text-to-text) with their processor.

Concurrent requests to one model are decoded together by its continuous-batching scheduler
(runners/batching.py); each request streams its chunks back to the event loop as they come.
LoRA adapters of the model are served with PEFT: one PeftModel around the loaded weights holds every
attached adapter, and each sequence in the batch names its own (runners/adapters.py).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import torch

from errors import InvalidRequest
from runners.base import Adapter, Chunk, PreparedPrompt, Runner
from runners.batching import BatchScheduler, Emit, Sequence
from runners.collector import ChunkCollector
from runners.cpu_speedups import apply_cpu_speedups, engine_threads
from runners.local_cache import LocalModel
from runners.model_info import describe, is_vision_model
from runners.quantization import Precision
from runners.structured import GrammarCache

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_EMBED_BATCH = 16  # texts per forward pass when embedding


class TransformersRunner(Runner):
    backend = "transformers"

    def __init__(
        self,
        model: LocalModel,
        precision: Precision,
        device: str,
        hf_model: Any,
        tokenizer: Any,
        max_batch_size: int,
        processor: Any = None,
    ) -> None:
        super().__init__(model, precision, device)
        self._hf_model = hf_model
        self.tokenizer = tokenizer
        self.processor = processor
        config = hf_model.config
        text_config = config.get_text_config()  # a vision model's language model holds the context
        self.context_length: int = (
            getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None) or 2048
        )
        eos = hf_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._eos_ids = frozenset(eos_ids)
        self._grammars = GrammarCache(tokenizer, config.get_text_config().vocab_size, sorted(self._eos_ids))
        self._scheduler = BatchScheduler(hf_model, model.ref.name, max_batch_size)
        # Embeddings: one batch of texts in the model at a time (more would only compete for the same
        # cores or GPU, and slow the decode loop); the others wait, reported with the generations.
        self._embedding = asyncio.Lock()
        self._embeds_running = 0
        self._embeds_waiting = 0
        self._peft: Any = None  # the PeftModel around _hf_model once an adapter is attached
        self._slots: dict[str, str] = {}  # adapter name -> its PEFT adapter name (no dots allowed there)
        self._attaching = asyncio.Lock()

    @classmethod
    def load(
        cls,
        model: LocalModel,
        precision: Precision,
        device: str,
        trust_remote_code: bool,
        *,
        max_batch_size: int,
        gpus: int = 1,
        cpu_threads: int = 0,
    ) -> TransformersRunner:
        """Load from the local snapshot folder only (blocking; never touches the network).

        `gpus` > 1 (TENSOR_PARALLEL_SIZE) on CUDA spreads the layers over the visible GPUs
        (accelerate's `device_map="auto"`): a model larger than one GPU runs, one GPU at a time."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, BitsAndBytesConfig

        common = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        processor = None
        if is_vision_model(describe(model).config):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(model.path, **common)
            tokenizer = processor.tokenizer
            if not getattr(tokenizer, "chat_template", None):  # some repos keep it on the processor only
                tokenizer.chat_template = processor.chat_template
        else:
            tokenizer = AutoTokenizer.from_pretrained(model.path, **common)
        kwargs: dict[str, Any] = dict(common)
        if precision.mode == "nf4":
            compute = torch.bfloat16 if device == "cuda" else torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
            kwargs["device_map"] = device
        elif precision.mode in _DTYPES:
            kwargs["dtype"] = _DTYPES[precision.mode]
        if device == "cuda" and gpus > 1 and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"
        auto_class = AutoModelForCausalLM if processor is None else AutoModelForImageTextToText
        hf_model = auto_class.from_pretrained(model.path, **kwargs)
        if "device_map" not in kwargs:
            hf_model.to(device)
        hf_model.eval()
        if device == "cpu":
            torch.set_num_threads(engine_threads(cpu_threads))
            apply_cpu_speedups(hf_model, max_batch_size)
        runner = cls(model, precision, device, hf_model, tokenizer, max_batch_size, processor)
        # Everything alive now (the model's modules, transformers' and torch's own objects) is long
        # lived: frozen, the cyclic collector stops re-scanning it, so the full collections the
        # decode loop's garbage triggers take milliseconds instead of stalling every stream.
        gc.collect()
        gc.freeze()
        return runner

    async def attach_adapter(self, adapter: Adapter) -> None:
        """Load a LoRA adapter into the PEFT model around this model's weights (made on the first),
        on the decode thread between two steps: PEFT injects its layers into the running model."""
        async with self._attaching:
            if adapter.name in self.adapters:
                return
            slot = f"adapter_{len(self._slots) + 1}"
            await asyncio.to_thread(self._scheduler.between_steps, lambda: self._load_adapter(adapter, slot))
            self._slots[adapter.name] = slot
            self.adapters[adapter.name] = adapter

    def _load_adapter(self, adapter: Adapter, slot: str) -> None:
        from peft import PeftModel

        path = str(adapter.local.path)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._hf_model, path, adapter_name=slot, is_trainable=False)
            self._peft.eval()
            self._scheduler.route_adapters(self._peft)
        else:
            self._peft.load_adapter(path, adapter_name=slot, is_trainable=False)

    async def generate(self, prepared: PreparedPrompt, adapter: str | None = None) -> AsyncIterator[Chunk]:
        output = ChunkCollector()  # bounded: chunks a slow reader has not taken merge into one
        if adapter is not None and adapter not in self._slots:
            raise InvalidRequest(f"LoRA adapter '{adapter}' is not attached to '{self.model.ref.name}'")
        # Compiling a grammar happens here, so its errors reach this request only.
        sequence = await asyncio.to_thread(self._sequence, prepared, output.put)
        sequence.adapter = self._slots.get(adapter) if adapter else None
        self._scheduler.submit(sequence)
        try:
            while True:
                item = await output.get()
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            sequence.cancelled.set()

    def _sequence(self, prepared: PreparedPrompt, emit: Emit) -> Sequence:
        response_format = prepared.request.response_format
        constraint = self._grammars.matcher(response_format) if response_format else None
        return Sequence(prepared, self.tokenizer, self._eos_ids, self.device, constraint, emit)

    def queue_depth(self) -> int:
        return self._scheduler.queue_depth() + self._embeds_waiting

    def batch_size(self) -> int:
        return self._scheduler.batch_size() + self._embeds_running

    @property
    def hf_model(self) -> Any:
        """The transformers model itself (read-only: for diagnostics and tests)."""
        return self._hf_model

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """One batch of inputs in the model at a time; the others wait (counted in queue_depth)."""
        self._embeds_waiting += 1
        try:
            await self._embedding.acquire()
        finally:
            self._embeds_waiting -= 1
        self._embeds_running += 1
        try:
            if self._peft is not None:
                # PEFT's layers apply adapters to any pass through the weights, and its per-pass
                # routing (module hooks) is shared: embed on the decode thread, adapters disabled.
                return await asyncio.to_thread(self._scheduler.between_steps, lambda: self._embed_base(token_ids))
            return await asyncio.to_thread(self._embed, token_ids)
        finally:
            self._embeds_running -= 1
            self._embedding.release()

    def _embed_base(self, encoded: list[list[int]]) -> list[list[float]]:
        with self._peft.disable_adapter():
            return self._embed(encoded)

    @torch.inference_mode()
    def _embed(self, encoded: list[list[int]]) -> list[list[float]]:
        """Mean of the last hidden states over each text's tokens, L2-normalized, in batches.

        Right padding with an attention mask: in a causal model the pads come after every real
        token, so they change nothing the mean reads.
        """
        vectors: list[list[float]] = []
        for start in range(0, len(encoded), _EMBED_BATCH):
            batch = encoded[start : start + _EMBED_BATCH]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([i + [0] * (width - len(i)) for i in batch], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in batch], device=self.device)
            hidden = self._hf_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            vectors.extend(torch.nn.functional.normalize(mean, dim=-1).tolist())
        return vectors

    def memory_bytes(self) -> int:
        return int(self._hf_model.get_memory_footprint())

    def unload(self) -> None:
        self._scheduler.close()
        self._peft = None
        del self._hf_model
        gc.unfreeze()  # frozen objects are never collected: the model's cycles must become collectable again
        release_memory(self.device)


def release_memory(device: str) -> None:
    """Return freed tensors to the system: collect cycles, then empty CUDA's caching allocator."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
