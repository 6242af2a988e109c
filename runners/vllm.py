"""The vLLM engine: one `AsyncLLM` per loaded model, streaming deltas as the engine produces them.

vLLM batches every concurrent request itself (continuous batching, paged KV cache). Its engine core
and workers run in processes of their own; unloading shuts them down and waits until they are gone.
vLLM is imported only here, and only when a model loads on it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

import psutil

from errors import InvalidRequest, ServerBusy, ServerError
from runners.base import Chunk, FinishReason, PreparedPrompt, ResponseFormat, Runner, TokenLogprob
from runners.local_cache import LocalModel
from runners.quantization import Precision
from settings import Settings

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.logprobs import SampleLogprobs
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

# Engines on one GPU share it: each takes this share of the memory, divided by MAX_CACHE_MODELS.
GPU_MEMORY_SHARE = 0.9
# On CPU the KV cache is sized in bytes (by default vLLM asks for most of a NUMA node and fails);
# VLLM_CPU_KVCACHE_SPACE (GiB) overrides this. A model whose full context does not fit gets a
# shorter one (max_model_len=-1: vLLM fits the context to the cache).
CPU_KV_CACHE_BYTES = 1 << 30
_DTYPES: dict[str, Literal["bfloat16", "float16", "float32"]] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
_SHUTDOWN_TIMEOUT = 30.0


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
        self._max_batch_size, self._max_queue = settings.max_batch_size, settings.max_queue
        self._requests = 0  # running and waiting in the engine
        self.tokenizer = engine.get_tokenizer()  # thread-safe: vLLM routes calls through a pool
        self.context_length = engine.model_config.max_model_len

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

        args = engine_args(model, precision, device, trust_remote_code, settings)
        before = {p.pid for p in _children()}
        free_before = _cuda_free_bytes() if device == "cuda" else 0
        engine = AsyncLLM.from_engine_args(args)
        processes = [p for p in _children() if p.pid not in before and not _is_resource_tracker(p)]
        memory = free_before - _cuda_free_bytes() if device == "cuda" else sum(_rss(p) for p in processes)
        return cls(model, precision, device, engine, processes, memory, settings)

    async def generate(self, prepared: PreparedPrompt) -> AsyncIterator[Chunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input

        if self._requests >= self._max_batch_size + self._max_queue:  # the same limit as the transformers runner's
            raise ServerBusy(
                f"server busy: model '{self.model.ref.name}' has {self._requests} requests running or waiting "
                f"(MAX_BATCH_SIZE={self._max_batch_size}, MAX_QUEUE={self._max_queue}); try again shortly",
                retry_after=1,
            )
        self._requests += 1
        request, ids = prepared.request, prepared.token_ids
        completion_tokens = 0
        try:
            params = sampling_params(prepared)
            # Closing this stream early (the client went away) makes vLLM abort the request in the
            # engine: no tokens are generated for nobody.
            inputs = tokens_input(ids, prompt=prepared.text)
            async with aclosing(self.engine.generate(inputs, params, uuid.uuid4().hex)) as outputs:
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
                    )
                    return
        except VLLMClientError as exc:  # the request itself is wrong (a parameter out of range, a bad schema)
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc
        finally:
            self._requests -= 1

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
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
    model: LocalModel, precision: Precision, device: str, trust_remote_code: bool, settings: Settings
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
        enforce_eager=device == "cpu",  # compiling costs ~50 s per start on CPU for ~20% speed
        disable_log_stats=True,
        # Compact JSON, as the transformers runner emits: with free whitespace, weak models can
        # spend their whole budget on spaces.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        **memory,
    )


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
