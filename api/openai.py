"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings.

Chat and text completions differ only in how the request becomes prompts and how a choice looks
(`_ChatShape` / `_TextShape`); both run the shared generation path, `n` samples per prompt at once.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.deps import get_runtime
from api.errors import stream_error
from api.openai_schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, GenerationParams
from api.streaming import SSE_MEDIA_TYPE, sse_event, started_stream, stream_generation
from errors import ModelNotFound
from runners import structured
from runners.base import Chunk, GenerationRequest, ResponseFormat, SamplingOptions, TokenLogprob
from runners.embedding import embed
from runners.generation import GenerationGroup, GenerationStats, start_generations
from runners.local_cache import LocalModel, find_local, list_local
from runners.names import parse_model_name
from runtime import Runtime

router = APIRouter(prefix="/v1", tags=["openai"])

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


# -- models --------------------------------------------------------------------------------------

def _model_card(local: LocalModel) -> dict[str, Any]:
    owner, _, _ = local.ref.repo_id.rpartition("/")
    return {"id": local.ref.name, "object": "model", "created": int(local.modified_at), "owned_by": owner or "huggingface"}


@router.get("/models")
async def list_models() -> dict[str, Any]:
    """The pulled models (the local cache), loaded or not."""
    return {"object": "list", "data": [_model_card(m) for m in await asyncio.to_thread(list_local)]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str) -> dict[str, Any]:
    ref = parse_model_name(model)
    local = await asyncio.to_thread(find_local, ref)
    if local is None:
        raise ModelNotFound(f"model '{ref.name}' does not exist here; pull it first (POST /pull)", param="model")
    return _model_card(local)


# -- embeddings ----------------------------------------------------------------------------------

def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await embed(runtime.pool, body.model, texts)
    data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


# -- completions ---------------------------------------------------------------------------------

class _ChatShape:
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    def delta(self, index: int, text: str | None, logprobs: list[TokenLogprob] | None = None,
              finish: str | None = None) -> dict[str, Any]:
        """A stream chunk's choice; text None: the opening chunk that names the role."""
        if text is None:
            delta = {"role": "assistant", "content": ""}
        elif text or logprobs:
            delta = {"content": text}
        else:  # the closing chunk, which only carries finish_reason
            delta = {}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": max(logprob, _MIN_LOGPROB), "bytes": list(token.encode())}

        if entries is None:
            return None
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}


class _TextShape:
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self) -> None:
        self._offsets: dict[int, int] = {}  # per choice: characters of text before the next token

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

    def delta(self, index: int, text: str | None, logprobs: list[TokenLogprob] | None = None,
              finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "text": text or "", "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        offsets, offset = [], self._offsets.get(index, 0)
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        self._offsets[index] = offset
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [max(e.logprob, _MIN_LOGPROB) for e in entries],
            "top_logprobs": [{t: max(lp, _MIN_LOGPROB) for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


_Shape = _ChatShape | _TextShape


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    # OpenAI's "developer" role is the system prompt under a newer name; templates know "system".
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    base = GenerationRequest(messages=messages, logprobs=body.logprob_count())
    return await _complete(runtime, body, [base], body.token_limit(), _ChatShape())


@router.post("/completions")
async def completions(body: CompletionRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    bases = [GenerationRequest(prompt=p, logprobs=body.logprob_count()) for p in body.prompts()]
    return await _complete(runtime, body, bases, body.token_limit(), _TextShape())


async def _response_format(body: GenerationParams) -> ResponseFormat | None:
    """The output constraint, checked before any model loads (a bad schema is the client's 400)."""
    param = body.response_format
    if param is None or param.type == "text":
        return None
    schema = param.json_schema.schema_ if param.json_schema else None
    response_format = ResponseFormat("json_schema", schema) if schema is not None else ResponseFormat("json")
    await asyncio.to_thread(structured.validate, response_format)  # the first use imports xgrammar
    return response_format


def _sampling(body: GenerationParams, max_tokens: int | None, sample: int) -> SamplingOptions:
    """The n samples of one prompt must differ even when seeded: sample i uses seed + i (as vLLM)."""
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p or 0.0,
        seed=None if body.seed is None else body.seed + sample,
        stop=body.stops(),
        repeat_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        ignore_eos=body.ignore_eos,
    )


async def _complete(
    runtime: Runtime, body: GenerationParams, bases: list[GenerationRequest], max_tokens: int | None, shape: _Shape
) -> Any:
    """Run n samples of every prompt (choice index = prompt * n + sample) and answer in `shape`."""
    response_format = await _response_format(body)
    requests = [
        dataclasses.replace(base, options=_sampling(body, max_tokens, sample), response_format=response_format)
        for base in bases
        for sample in range(body.n)
    ]
    group = await start_generations(runtime.pool, body.model, requests)
    head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(group.created_at.timestamp()),
            "model": body.model}
    if body.stream:
        chunks = await started_stream(group.stream())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(group, chunks, body.n, head, shape, include_usage)
        return stream_generation(group, events, SSE_MEDIA_TYPE)
    done = await group.collect()
    return {
        **head,
        "object": shape.object,
        "choices": [shape.choice(i, c.text, c.logprobs, _finish(c.stats)) for i, c in enumerate(done)],
        "usage": _usage([c.stats for c in done], body.n),
    }


async def _stream_events(
    group: GenerationGroup,
    chunks: AsyncIterator[tuple[int, Chunk]],
    n: int,
    head: dict[str, Any],
    shape: _Shape,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: the role (chat), content deltas, a finish chunk per choice, the
    usage chunk if asked, `[DONE]`. A failure after the first byte becomes an in-band error event."""

    def event(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> str:
        payload = {**head, "object": shape.chunk_object, "choices": list(choices)}
        return sse_event({**payload, "usage": usage} if include_usage else payload)

    def events_of(index: int, chunk: Chunk) -> Iterator[str]:
        if chunk.text or chunk.logprobs:
            yield event(shape.delta(index, chunk.text, chunk.logprobs))
        if chunk.finish_reason is not None:
            stats = group.generations[index].stats
            assert stats is not None
            yield event(shape.delta(index, "", finish=_finish(stats)))

    try:
        if isinstance(shape, _ChatShape):
            yield event(*(shape.delta(i, None) for i in range(len(group.generations))))
        async for index, chunk in chunks:
            for line in events_of(index, chunk):
                yield line
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, then stop
        yield stream_error(exc, "openai")
        return
    if include_usage:
        yield event(usage=_usage(group.stats(), n))
    yield sse_event("[DONE]")


def _finish(stats: GenerationStats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


def _usage(stats: list[GenerationStats], n: int) -> dict[str, int]:
    """Completion tokens of every choice; each prompt's tokens once, however many samples it had."""
    prompt = sum(s.prompt_tokens for s in stats[::n])
    completion = sum(s.completion_tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
