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
from datetime import timezone
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api import openai_response_models as response_models
from api.deps import get_runtime
from api.errors import stream_error
from api.openai_schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, GenerationParams
from api.openapi_docs import answers, errors
from api.streaming import SSE_MEDIA_TYPE, sse_event, started_stream, stream_generation
from api.strict_json import StrictJSONRoute
from errors import InvalidRequest, ModelNotFound
from jobs.presets import Preset
from runners import structured
from runners.adapters import described_by
from runners.base import (
    GenerationRequest,
    OutputDelta,
    ResponseFormat,
    SamplingOptions,
    TokenLogprob,
    ToolCallDelta,
    left_out,
)
from runners.embedding import embed
from runners.generation import Completion, Generation, GenerationGroup, GenerationStats, start_generations
from runners.limits import SEED_MIN
from runners.local_cache import LocalModel, find_local, list_local
from runners.names import parse_model_name
from runners.output_parsing import finish_reason
from runtime import Runtime

router = APIRouter(
    prefix="/v1", tags=["openai"], route_class=StrictJSONRoute, responses=errors(response_models.OpenAIErrorResponse)
)

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


# -- models --------------------------------------------------------------------------------------


def _model_card(local: LocalModel) -> dict[str, Any]:
    owner, _, _ = local.ref.repo_id.rpartition("/")
    card = {
        "id": local.ref.name,
        "object": "model",
        "created": int(local.modified_at),
        "owned_by": owner or "huggingface",
    }
    if local.is_adapter:  # a LoRA adapter: its base as `parent`, as vLLM's server lists adapters
        card["parent"] = described_by(local)[1] or None
    return card


def _preset_card(preset: Preset) -> dict[str, Any]:
    created = preset.created_at if preset.created_at.tzinfo else preset.created_at.replace(tzinfo=timezone.utc)
    return {"id": preset.name, "object": "model", "created": int(created.timestamp()), "owned_by": "ai-server"}


def _all_cards(runtime: Runtime) -> list[dict[str, Any]]:
    return [_model_card(m) for m in list_local()] + [_preset_card(p) for p in runtime.presets.list()]


@router.get("/models", responses=answers(response_models.ModelList))
async def list_models(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    """The pulled models (the local cache), loaded or not, and the presets made from them."""
    return {"object": "list", "data": await asyncio.to_thread(_all_cards, runtime)}


@router.get("/models/{model:path}", responses=answers(response_models.Model))
async def retrieve_model(model: str, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    ref = parse_model_name(model)
    preset = await asyncio.to_thread(runtime.presets.get, ref.name)
    if preset is not None:
        return _preset_card(preset)
    local = await asyncio.to_thread(find_local, ref)
    if local is None:
        raise ModelNotFound(f"model '{ref.name}' does not exist here; pull it first (POST /pull)", param="model")
    return _model_card(local)


# -- embeddings ----------------------------------------------------------------------------------


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/embeddings", responses=answers(response_models.CreateEmbeddingResponse))
async def embeddings(body: EmbeddingRequest, runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await embed(runtime.pool, body.model, texts, presets=runtime.presets)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


# -- completions ---------------------------------------------------------------------------------


class _ChatShape:
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, include_reasoning: bool = True) -> None:
        self._include_reasoning = include_reasoning

    def choice(self, index: int, done: Completion, finish: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": done.text or (None if done.tool_calls else "")}
        if done.reasoning and self._include_reasoning:
            message |= _reasoning_fields(done.reasoning)
        if done.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in done.tool_calls
            ]
        return {"index": index, "message": message, "logprobs": self._logprobs(done.logprobs), "finish_reason": finish}

    def delta(self, index: int, piece: OutputDelta | None, finish: str | None = None) -> dict[str, Any]:
        """A stream chunk's choice; piece None: the opening chunk that names the role (or, with
        `finish`, the closing chunk, which only carries finish_reason)."""
        delta: dict[str, Any] = {}
        if piece is None and finish is None:
            delta = {"role": "assistant", "content": ""}
        elif piece is not None:
            if piece.content or (piece.logprobs and not piece.reasoning and not piece.tool_calls):
                delta["content"] = piece.content
            if piece.reasoning and self._include_reasoning:
                delta |= _reasoning_fields(piece.reasoning)
            if piece.tool_calls:
                delta["tool_calls"] = [_tool_call_delta(call) for call in piece.tool_calls]
        logprobs = piece.logprobs if piece is not None else None
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    @staticmethod
    def _logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": max(logprob, _MIN_LOGPROB), "bytes": list(token.encode())}

        if entries is None:
            return None
        return {
            "content": [
                {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
            ],
            "refusal": None,
        }


def _reasoning_fields(text: str) -> dict[str, str]:
    """vLLM's reasoning field under both names clients read: `reasoning_content` (vLLM before
    0.11, Open WebUI, LangChain, DeepSeek's API) and `reasoning` (vLLM since)."""
    return {"reasoning_content": text, "reasoning": text}


def _tool_call_delta(call: ToolCallDelta) -> dict[str, Any]:
    """vLLM's streamed tool call: index, id, type and name first, then argument pieces."""
    out: dict[str, Any] = {"index": call.index}
    function: dict[str, Any] = {}
    if call.id is not None:
        out |= {"id": call.id, "type": "function"}
    if call.name is not None:
        function["name"] = call.name
    if call.arguments or call.name is not None:
        function["arguments"] = call.arguments
    out["function"] = function
    return out


class _TextShape:
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self) -> None:
        self._offsets: dict[int, int] = {}  # per choice: characters of text before the next token

    def choice(self, index: int, done: Completion, finish: str) -> dict[str, Any]:
        logprobs = self._logprobs(index, done.logprobs)
        return {"index": index, "text": done.text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, piece: OutputDelta | None, finish: str | None = None) -> dict[str, Any]:
        text, logprobs = (piece.content, piece.logprobs) if piece is not None else ("", None)
        return {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

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


@router.post(
    "/chat/completions",
    responses=answers(
        response_models.ChatCompletion, stream=SSE_MEDIA_TYPE, stream_model=response_models.ChatCompletionChunk
    ),
)
async def chat_completions(body: ChatCompletionRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    base = GenerationRequest(
        messages=[m.for_template(i) for i, m in enumerate(body.messages)],
        logprobs=body.logprob_count(),
        tools=body.tool_list(),
        tool_choice=body.tool_choice_value(),
        parallel_tool_calls=body.parallel_tool_calls,
        template_kwargs=body.template_kwargs(),
    )
    return await _complete(runtime, body, [base], body.token_limit(), _ChatShape(body.include_reasoning))


@router.post("/completions", responses=answers(response_models.Completion, stream=SSE_MEDIA_TYPE))
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
        seed=None if body.seed is None else _wrap_seed(body.seed + sample),
        stop=body.stops(),
        repeat_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        ignore_eos=body.ignore_eos,
        defaulted=left_out(
            max_tokens=getattr(body, "max_completion_tokens", None) or body.max_tokens,  # not the default 16
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            stop=body.stop,
            repeat_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            ignore_eos=body.ignore_eos or None,
        ),
    )


def _wrap_seed(seed: int) -> int:
    """seed + i past the largest seed wraps around, staying a 64-bit seed."""
    return (seed - SEED_MIN) % 2**64 + SEED_MIN


async def _complete(
    runtime: Runtime, body: GenerationParams, bases: list[GenerationRequest], max_tokens: int | None, shape: _Shape
) -> Any:
    """Run n samples of every prompt (choice index = prompt * n + sample) and answer in `shape`."""
    most = runtime.settings.max_batch_size + runtime.settings.max_queue
    if len(bases) * body.n > most:  # could never run: not "busy" (503) but a request to change (400)
        raise InvalidRequest(
            f"{len(bases) * body.n} sequences (n={body.n} per prompt) is more than this server ever runs for one "
            f"model at once ({most}: MAX_BATCH_SIZE + MAX_QUEUE)",
            param="n",
        )
    response_format = await _response_format(body)
    requests = [
        dataclasses.replace(base, options=_sampling(body, max_tokens, sample), response_format=response_format)
        for base in bases
        for sample in range(body.n)
    ]
    group = await start_generations(runtime.pool, body.model, requests, presets=runtime.presets)
    head = {
        "id": f"{shape.id_prefix}-{uuid.uuid4().hex}",
        "created": int(group.created_at.timestamp()),
        "model": body.model,
    }
    if body.stream:
        chunks = await started_stream(group.stream())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(group, chunks, body.n, head, shape, include_usage)
        return stream_generation(group, events, SSE_MEDIA_TYPE)
    done = await group.collect()
    return {
        **head,
        "object": shape.object,
        "choices": [
            shape.choice(i, c, _finish(c, g)) for i, (c, g) in enumerate(zip(done, group.generations, strict=True))
        ],
        "usage": _usage([c.stats for c in done], body.n),
    }


async def _stream_events(
    group: GenerationGroup,
    pieces: AsyncIterator[tuple[int, OutputDelta]],
    n: int,
    head: dict[str, Any],
    shape: _Shape,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: the role (chat), content / reasoning / tool-call deltas, a finish
    chunk per choice, the usage chunk if asked, `[DONE]`. A failure after the first byte becomes an
    in-band error event."""

    def event(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> str:
        payload = {**head, "object": shape.chunk_object, "choices": list(choices)}
        return sse_event({**payload, "usage": usage} if include_usage else payload)

    called = [False] * len(group.generations)  # whether a choice has made a tool call

    def events_of(index: int, piece: OutputDelta) -> Iterator[str]:
        called[index] = called[index] or bool(piece.tool_calls)
        if piece or piece.logprobs:
            yield event(shape.delta(index, piece))
        if piece.finish_reason is not None:
            generation = group.generations[index]
            assert generation.stats is not None
            reason = finish_reason(generation.stats.finish_reason, called[index], generation.named_tool)
            yield event(shape.delta(index, None, finish=reason))

    try:
        if isinstance(shape, _ChatShape):
            yield event(*(shape.delta(i, None) for i in range(len(group.generations))))
        async for index, piece in pieces:
            for line in events_of(index, piece):
                yield line
    except Exception as exc:
        yield stream_error(exc, "openai")
        return
    if include_usage:
        yield event(usage=_usage(group.stats(), n))
    yield sse_event("[DONE]")


def _finish(done: Completion, generation: Generation) -> str:
    return finish_reason(done.stats.finish_reason, bool(done.tool_calls), generation.named_tool)


def _usage(stats: list[GenerationStats], n: int) -> dict[str, int]:
    """Completion tokens of every choice; each prompt's tokens once, however many samples it had."""
    prompt = sum(s.prompt_tokens for s in stats[::n])
    completion = sum(s.completion_tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
