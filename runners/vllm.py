"""The vLLM engine: one `AsyncLLM` per loaded model, streaming deltas as the engine produces them.

vLLM batches every concurrent request itself (continuous batching, paged KV cache). Its engine core
and workers run in processes of their own; unloading shuts them down and waits until they are gone.
vLLM is imported only here, and only when a model loads on it.

LoRA adapters (runners/adapters.py): an engine starts with vLLM's LoRA support when adapters of its
model are pulled, and each request for an adapter carries its LoRARequest, so requests for different
adapters share the batch (MAX_LORAS adapters per batch, ranks up to MAX_LORA_RANK).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

import psutil

from errors import InvalidRequest, ServerError
from runners.adapters import adapters_of, vllm_refusal
from runners.base import (
    Adapter,
    AdapterRefused,
    Chunk,
    FinishReason,
    PreparedPrompt,
    ResponseFormat,
    Runner,
    TokenLogprob,
)
from runners.local_cache import LocalModel
from runners.quantization import Precision
from settings import Settings

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.logprobs import SampleLogprobs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

# Engines on one GPU share it: each takes this share of the memory, divided by MAX_CACHE_MODELS.
GPU_MEMORY_SHARE = 0.9
# On CPU the KV cache is sized in bytes (by default vLLM asks for most of a NUMA node and fails);
# VLLM_CPU_KVCACHE_SPACE (GiB) overrides this. A model whose full context does not fit gets a
# shorter one (max_model_len=-1: vLLM fits the context to the cache).
CPU_KV_CACHE_BYTES = 1 << 30
# Whether vLLM skips compilation when ENFORCE_EAGER is unset. GPU: compiled with CUDA graphs (vLLM's
# default). CPU: eager. Measured by bench/compile_start.py on the 2-core CI machine kind (README,
# Performance): compiling costs 127 s on the first start and still 70 s with its caches in DATA_DIR,
# against 44 s eager, for 0.97x (1 stream) and 1.07x (8 streams) the eager tokens/s: it does not pay.
EAGER_BY_DEFAULT = {"cuda": False, "cpu": True}
_DTYPES: dict[str, Literal["bfloat16", "float16", "float32"]] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
_SHUTDOWN_TIMEOUT = 30.0
_LORA_IDS = itertools.count(1)  # vLLM wants a unique positive int per adapter


class VllmRunner(Runner):
    backend = "vllm"

    def __init__(
        self,
        model: LocalModel,
        precision: Precision,
        device: str,
        engine: AsyncLLM,
        processes: list[psutil.Process],
        memory: int,
        settings: Settings,
    ) -> None:
        super().__init__(model, precision, device)
        self.engine = engine
        self._processes = processes  # the engine core and its workers, children of this process
        self._memory = memory
        self._max_batch_size = settings.max_batch_size
        self._requests = 0  # running and waiting in the engine (the pool's lease admitted them)
        self.tokenizer = engine.get_tokenizer()  # thread-safe: vLLM routes calls through a pool
        self.context_length = engine.model_config.max_model_len
        self._settings = settings
        self.lora_enabled = engine.vllm_config.lora_config is not None
        self._loras: dict[str, LoRARequest] = {}
        self._attaching = asyncio.Lock()  # one registration per adapter, however many requests ask

    @classmethod
    def load(
        cls, model: LocalModel, precision: Precision, device: str, trust_remote_code: bool, settings: Settings
    ) -> VllmRunner:
        """Start an engine on the local snapshot (blocking, ~15 s on CPU). Safe in a worker thread:
        the engine binds to the event loop on its first request."""
        # vLLM's compile caches go to the server's data folder unless the operator chose a place;
        # its usage statistics stay off, like every other phone-home of this server.
        os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.data_dir / "cache" / "vllm"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "cache" / "torchinductor"))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm.v1.engine.async_llm import AsyncLLM

        # LoRA costs memory and speed: only for a model whose adapters are pulled.
        args = engine_args(model, precision, device, trust_remote_code, settings, lora=bool(adapters_of(model.ref)))
        before = {p.pid for p in _children()}
        free_before = _cuda_free_bytes() if device == "cuda" else 0
        engine = AsyncLLM.from_engine_args(args)
        processes = [p for p in _children() if p.pid not in before and not _is_resource_tracker(p)]
        memory = free_before - _cuda_free_bytes() if device == "cuda" else sum(_rss(p) for p in processes)
        return cls(model, precision, device, engine, processes, memory, settings)

    async def attach_adapter(self, adapter: Adapter) -> None:
        """Register the adapter with the engine (it loads now, so a broken adapter fails here);
        AdapterRefused when vLLM cannot serve it."""
        async with self._attaching:
            if adapter.name not in self.adapters:
                await self._register(adapter)

    async def _register(self, adapter: Adapter) -> None:
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise AdapterRefused("the engine was started without LoRA")
        reason = vllm_refusal(adapter, self._settings)
        if reason is not None:
            raise AdapterRefused(reason)
        # Named by its commit too: an adapter pulled anew is a new adapter to vLLM, not its cached one.
        request = LoRARequest(f"{adapter.name}@{adapter.local.commit}", next(_LORA_IDS), str(adapter.local.path))
        try:
            await self.engine.add_lora(request)
        except Exception as exc:
            raise AdapterRefused(f"{type(exc).__name__}: {exc}") from exc
        self._loras[adapter.name] = request
        self.adapters[adapter.name] = adapter

    async def generate(self, prepared: PreparedPrompt, adapter: str | None = None) -> AsyncIterator[Chunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input

        lora = None
        if adapter is not None:
            lora = self._loras.get(adapter)
            if lora is None:
                raise InvalidRequest(f"LoRA adapter '{adapter}' is not attached to '{self.model.ref.name}'")
        self._requests += 1
        request, ids = prepared.request, prepared.token_ids
        completion_tokens = 0
        try:
            params = sampling_params(prepared)
            # Closing this stream early (the client went away) makes vLLM abort the request in the
            # engine: no tokens are generated for nobody.
            inputs = tokens_input(ids, prompt=prepared.text)
            stream = self.engine.generate(inputs, params, uuid.uuid4().hex, lora_request=lora)
            async with aclosing(stream) as outputs:
                async for output in outputs:
                    out = output.outputs[0]
                    completion_tokens += len(out.token_ids)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = convert_logprobs(out.token_ids, out.logprobs or [], request.logprobs)
                    token_ids = list(out.token_ids)
                    if not output.finished:
                        yield Chunk(out.text, logprobs=logprobs, token_ids=token_ids)
                        continue
                    yield Chunk(
                        out.text,
                        finish_reason=_finish_reason(out.finish_reason),
                        prompt_tokens=len(output.prompt_token_ids or ids),
                        completion_tokens=completion_tokens,
                        logprobs=logprobs,
                        token_ids=token_ids,
                        # vLLM's stop_reason: the matched stop string, a stop token id, or None.
                        stop_sequence=out.stop_reason if isinstance(out.stop_reason, str) else None,
                    )
                    return
        except VLLMClientError as exc:  # the request itself is wrong (a parameter out of range, a bad schema)
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc
        finally:
            self._requests -= 1

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        # Never reached through the pool, which embeds with a transformers runner of the same weights.
        raise InvalidRequest(f"model '{self.model.ref.name}' runs on vLLM's generation engine, which cannot embed")

    def batch_size(self) -> int:
        """Requests decoding now: vLLM runs up to MAX_BATCH_SIZE (its max_num_seqs) at once."""
        return min(self._requests, self._max_batch_size)

    def queue_depth(self) -> int:
        """Requests waiting in vLLM's scheduler for a batch slot."""
        return self._requests - self.batch_size()

    def memory_bytes(self) -> int:
        return self._memory

    def unload(self) -> None:
        """Shut the engine down and wait until its processes have exited (their memory, CUDA
        included, goes with them); any that linger are killed."""
        self.engine.shutdown(timeout=_SHUTDOWN_TIMEOUT)
        _, alive = psutil.wait_procs(self._processes, timeout=_SHUTDOWN_TIMEOUT)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)


def engine_args(
    model: LocalModel,
    precision: Precision,
    device: str,
    trust_remote_code: bool,
    settings: Settings,
    lora: bool = False,
) -> AsyncEngineArgs:
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    memory: dict[str, Any] = (
        {"gpu_memory_utilization": GPU_MEMORY_SHARE / settings.max_cache_models}
        if device == "cuda"
        else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    )
    return AsyncEngineArgs(
        model=str(model.path),
        tokenizer=str(model.path),
        trust_remote_code=trust_remote_code,
        dtype=_DTYPES.get(precision.mode, "auto"),  # nf4 and prequantized: the checkpoint's
        quantization="bitsandbytes" if precision.mode == "nf4" else None,
        max_model_len=-1,  # the model's own context, shortened only if the KV cache cannot hold it
        max_num_seqs=settings.max_batch_size,
        # Split each model across this many GPUs (models larger than one); one on CPU.
        tensor_parallel_size=settings.tensor_parallel_size if device == "cuda" else 1,
        enforce_eager=eager(device, settings),
        disable_log_stats=True,
        # Compact JSON, as the transformers runner emits: with free whitespace, weak models can
        # spend their whole budget on spaces.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        enable_lora=lora,
        # vLLM's CPU LoRA ops apply the last slot's adapter to requests without one: fixed in its worker.
        worker_extension_cls="runners.vllm_cpu_lora.NoAdapterRowsFix" if lora and device == "cpu" else "",
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,  # type: ignore[arg-type]
        **memory,
    )


def eager(device: str, settings: Settings) -> bool:
    """Whether vLLM runs uncompiled: ENFORCE_EAGER when set, else EAGER_BY_DEFAULT for the device."""
    return settings.enforce_eager if settings.enforce_eager is not None else EAGER_BY_DEFAULT[device]


def sampling_params(prepared: PreparedPrompt) -> SamplingParams:
    """The request's options as vLLM's SamplingParams, one to one.

    `repeat_last_n` has no vLLM counterpart: vLLM's repetition penalty covers the whole context.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    request = prepared.request
    options = request.options
    return SamplingParams(
        max_tokens=prepared.max_new_tokens,
        skip_special_tokens=prepared.skip_special_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        seed=options.seed,
        stop=list(options.stop),
        repetition_penalty=options.repeat_penalty,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        ignore_eos=options.ignore_eos,
        logprobs=request.logprobs,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=_structured_outputs(request.response_format),
    )


def _structured_outputs(response_format: ResponseFormat | None) -> StructuredOutputsParams | None:
    from vllm.sampling_params import StructuredOutputsParams

    if response_format is None:
        return None
    if response_format.kind == "json":
        return StructuredOutputsParams(json_object=True)
    if response_format.kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=response_format.structural_tag)
    return StructuredOutputsParams(json=response_format.schema)


def convert_logprobs(token_ids: Sequence[int], entries: SampleLogprobs, top: int) -> list[TokenLogprob]:
    """vLLM's per-token {token_id: Logprob} (the sampled token plus the `top` best) as TokenLogprobs."""
    converted = []
    for token_id, entry in zip(token_ids, entries, strict=True):  # vLLM gives each sampled token its entry
        if entry is None:  # the type admits it for prompt positions; sampled ones always have one
            raise ServerError("the vLLM engine returned a token without its logprobs")
        chosen = entry[token_id]
        by_rank = {lp.rank: lp for lp in entry.values() if lp.rank is not None and lp.rank <= top}
        best = [by_rank[rank] for rank in sorted(by_rank)]
        converted.append(
            TokenLogprob(
                chosen.decoded_token or "", chosen.logprob, [(lp.decoded_token or "", lp.logprob) for lp in best]
            )
        )
    return converted


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in _FINISH:
        return _FINISH[reason]
    raise ServerError(f"the vLLM engine ended the request: {reason}")


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker starts with the first engine and serves the whole process."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def _cuda_free_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]
