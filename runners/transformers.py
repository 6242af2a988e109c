"""The transformers engine: any causal LM transformers can load, on CUDA or CPU.

Each request decodes in a worker thread of its own and streams chunks back to the event loop, so
concurrent requests to one model all make progress; nothing holds a per-model lock.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from errors import InvalidRequest
from runners.base import Chunk, GenerationRequest, Runner, TokenLogprob
from runners.detokenize import IncrementalDecoder, StopMatcher
from runners.local_cache import LocalModel
from runners.prompt import render_prompt
from runners.quantization import Precision
from runners.sampling import make_generator, next_token
from runners.structured import GrammarCache

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_EMBED_BATCH = 16  # texts per forward pass when embedding


class TransformersRunner(Runner):
    backend = "transformers"

    def __init__(
        self, model: LocalModel, precision: Precision, device: str, hf_model: Any, tokenizer: Any
    ) -> None:
        super().__init__(model, precision, device)
        self._hf_model = hf_model
        self.tokenizer = tokenizer
        config = hf_model.config
        self.context_length: int = (
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        eos = hf_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._eos_ids = frozenset(eos_ids)
        self._grammars = GrammarCache(tokenizer, config.get_text_config().vocab_size, sorted(self._eos_ids))

    @classmethod
    def load(cls, model: LocalModel, precision: Precision, device: str, trust_remote_code: bool) -> TransformersRunner:
        """Load from the local snapshot folder only (blocking; never touches the network)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        common = {"local_files_only": True, "trust_remote_code": trust_remote_code}
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
        hf_model = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
        if "device_map" not in kwargs:
            hf_model.to(device)
        hf_model.eval()
        return cls(model, precision, device, hf_model, tokenizer)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Chunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        worker = threading.Thread(
            target=self._decode, args=(request, emit, cancelled), name="transformers-decode", daemon=True
        )
        worker.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancelled.set()

    def _decode(
        self,
        request: GenerationRequest,
        emit: Callable[[Chunk | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        try:
            self._decode_loop(request, emit, cancelled)
        except BaseException as exc:  # surfaced to the awaiting request, not lost in the thread
            emit(exc)

    @torch.inference_mode()
    def _decode_loop(
        self,
        request: GenerationRequest,
        emit: Callable[[Chunk | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        options = request.options
        prompt_ids = self._encode(render_prompt(self.tokenizer, request), special_tokens=False, reserve=1)
        room = self.context_length - len(prompt_ids)
        budget = room if options.max_tokens is None else min(options.max_tokens, room)
        decoder, stops = IncrementalDecoder(self.tokenizer), StopMatcher(options.stop)
        generator = make_generator(options, self.device)
        constraint = self._grammars.matcher(request.response_format) if request.response_format else None
        # Log-probabilities of tokens not yet sent: they travel with the next chunk.
        pending: list[TokenLogprob] | None = None if request.logprobs is None else []

        def send(text: str, **final: Any) -> None:
            nonlocal pending
            emit(Chunk(text, logprobs=pending, **final))
            pending = None if pending is None else []

        context, generated = list(prompt_ids), []
        finish, hit_stop, unsent = "length", False, ""
        inputs = torch.tensor([prompt_ids], device=self.device)
        past = None
        while len(generated) < budget:
            if cancelled.is_set():
                finish = "cancelled"
                break
            out = self._hf_model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
            token = next_token(constraint.mask(logits) if constraint else logits, options, context, generated, generator)
            if constraint:
                constraint.accept(token)
            if token in self._eos_ids and not options.ignore_eos:
                finish = "stop"
                break
            if pending is not None:
                pending.append(self._logprob(logits, token, request.logprobs or 0))
            context.append(token)
            generated.append(token)
            unsent, hit_stop = stops.feed(decoder.push(token))
            if hit_stop or (constraint is not None and constraint.finished):
                finish = "stop"
                break
            if unsent:
                send(unsent)
                unsent = ""
            inputs = torch.tensor([[token]], device=self.device)
        # Text held back as a possible stop sequence is output, unless a stop sequence did match.
        tail = unsent if hit_stop else unsent + stops.flush()
        send(tail, finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=len(generated))

    def _encode(self, text: str, *, special_tokens: bool, reserve: int) -> list[int]:
        """Token ids of one input, refused (400) unless `reserve` more tokens fit in the context."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        if not ids:
            ids = [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id or 0]
        if len(ids) + reserve > self.context_length:
            raise InvalidRequest(f"input is {len(ids)} tokens; the model's context is {self.context_length} tokens")
        return ids

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """The chosen token's log-probability under the model's raw distribution (before penalties,
        temperature and grammar, like vLLM's default), with the `top` most likely tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        entry = TokenLogprob(self.tokenizer.decode([token]), float(logprobs[token]))
        if top:
            values, ids = torch.topk(logprobs, top)
            entry.top = [(self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
        return entry

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return await asyncio.to_thread(self._embed, texts)

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean of the last hidden states over each text's tokens, L2-normalized, in batches.

        Right padding with an attention mask: in a causal model the pads come after every real
        token, so they change nothing the mean reads.
        """
        encoded = [self._encode(text, special_tokens=True, reserve=0) for text in texts]
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
        return vectors, sum(len(ids) for ids in encoded)

    def memory_bytes(self) -> int:
        return int(self._hf_model.get_memory_footprint())

    def unload(self) -> None:
        del self._hf_model
        release_memory(self.device)


def release_memory(device: str) -> None:
    """Return freed tensors to the system: collect cycles, then empty CUDA's caching allocator."""
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
