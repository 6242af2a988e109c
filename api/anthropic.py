"""Anthropic's Messages API: POST /v1/messages (JSON and SSE) and POST /v1/messages/count_tokens.

What Claude Code and the Anthropic SDKs speak (`ANTHROPIC_BASE_URL=http://host:port`). The request
becomes the server's chat messages (api/anthropic_schemas.py) and runs the shared generation path;
this module only shapes its output into content blocks (`thinking`, `text`, `tool_use`) and
Anthropic's stream events. Errors reach the client in Anthropic's shape through api/errors.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.anthropic_schemas import CountTokensRequest, MessagesRequest, anthropic_error
from api.deps import get_runtime
from api.streaming import SSE_MEDIA_TYPE, started_stream, stream_generation
from errors import ServerError
from runners import structured
from runners.base import GenerationRequest, OutputDelta, ResponseFormat, SamplingOptions, left_out
from runners.generation import Completion, Generation, GenerationStats, start_generation
from runtime import Runtime

router = APIRouter(prefix="/v1", tags=["anthropic"])


async def _generation_request(body: CountTokensRequest, options: SamplingOptions | None = None) -> GenerationRequest:
    return GenerationRequest(
        messages=body.chat_messages(),
        options=options or SamplingOptions(),
        response_format=await _response_format(body),
        tools=body.tool_list(),
        tool_choice=body.tool_choice_value(),
        parallel_tool_calls=body.parallel_tool_calls(),
        template_kwargs=body.template_kwargs(),
    )


async def _response_format(body: CountTokensRequest) -> ResponseFormat | None:
    """output_config.format as an output constraint, checked before any model loads (a bad schema is a 400)."""
    if body.output_config is None or body.output_config.format is None:
        return None
    response_format = ResponseFormat("json_schema", body.output_config.format.schema_)
    await asyncio.to_thread(structured.validate, response_format)  # the first use imports xgrammar
    return response_format


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, runtime: Runtime = Depends(get_runtime)) -> dict[str, int]:
    """The prompt's tokens as the model's template renders it, tools included; nothing is generated."""
    generation = await start_generation(
        runtime.pool, body.model, await _generation_request(body), presets=runtime.presets
    )
    await generation.close()
    return {"input_tokens": len(generation.prepared.token_ids)}


@router.post("/messages")
async def messages(body: MessagesRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    options = SamplingOptions(
        max_tokens=body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # Anthropic's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=list(body.stop_sequences or []),
        defaulted=left_out(
            max_tokens=body.max_tokens,  # required by Anthropic's API: always the request's
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_sequences,
        ),
    )
    generation = await start_generation(
        runtime.pool, body.model, await _generation_request(body, options), presets=runtime.presets
    )
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        pieces = await started_stream(generation.stream())
        return stream_generation(generation, _events(generation, pieces, message_id), SSE_MEDIA_TYPE)
    done = await generation.collect()
    return JSONResponse(
        {
            **_message_head(message_id, generation.model),
            "content": _content_blocks(done),
            **_stop_fields(done.stats, bool(done.tool_calls)),
            "usage": {"input_tokens": done.stats.prompt_tokens, "output_tokens": done.stats.completion_tokens},
        }
    )


def _message_head(message_id: str, model: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }


def _stop_fields(stats: GenerationStats, called: bool) -> dict[str, str | None]:
    """`stop_reason` and `stop_sequence`: `max_tokens` when the budget ran out (a call cut short is
    no call), `tool_use` when the model called a tool, `stop_sequence` (with the sequence) when one
    of the client's `stop_sequences` ended it, else `end_turn`."""
    if stats.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if called:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if stats.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stats.stop_sequence}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def _content_blocks(done: Completion) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if done.reasoning:
        blocks.append({"type": "thinking", "thinking": done.reasoning, "signature": ""})
    if done.text or not (done.reasoning or done.tool_calls):
        blocks.append({"type": "text", "text": done.text})
    blocks += [
        {"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments_object())}
        for call in done.tool_calls
    ]
    return blocks


def _input(arguments: Any) -> dict[str, Any]:
    """tool_use `input` is an object; arguments that are not one are kept whole under `arguments`."""
    return arguments if isinstance(arguments, dict) else {"arguments": arguments}


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n"


class _Blocks:
    """Content blocks opened and closed as parsed pieces arrive: one block per kind of output in a
    row (thinking, text) and one per tool call, each with its own index."""

    def __init__(self) -> None:
        self.count = 0
        self.open_kind: str | None = None
        self.open_call: int | None = None  # the tool call index the open tool_use block is for

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.open_kind = kind
        events.append(_event("content_block_start", {"index": self.count, "content_block": block}))
        if self.count == 0:
            events.append(_event("ping", {}))  # where Anthropic sends it: after the first block starts
        return events

    def close(self) -> list[str]:
        if self.open_kind is None:
            return []
        # Anthropic ends a thinking block with its signature; there is none here (signatures are
        # Anthropic's own, and ignored when clients send them back), so it is empty.
        events = [self._delta({"type": "signature_delta", "signature": ""})] if self.open_kind == "thinking" else []
        self.open_kind, self.open_call = None, None
        self.count += 1
        return [*events, _event("content_block_stop", {"index": self.count - 1})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", {"index": self.count, "delta": delta})

    def feed(self, piece: OutputDelta) -> list[str]:
        events: list[str] = []
        if piece.reasoning:
            if self.open_kind != "thinking":
                events += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": piece.reasoning}))
        if piece.content:
            if self.open_kind != "text":
                events += self._start("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": piece.content}))
        for call in piece.tool_calls:
            if self.open_kind != "tool_use" or self.open_call != call.index:
                block = {
                    "type": "tool_use",
                    "id": call.id or f"call_{uuid.uuid4().hex[:24]}",
                    "name": call.name or "",
                    "input": {},
                }
                events += self._start("tool_use", block)
                self.open_call = call.index
            if call.arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return events


async def _events(generation: Generation, pieces: AsyncIterator[OutputDelta], message_id: str) -> AsyncIterator[str]:
    """Anthropic's event sequence: message_start, per block content_block_start / _delta / _stop
    (a ping after the first start), message_delta with the stop reason and usage, message_stop.
    A failure after the first byte becomes an in-band `error` event."""
    prompt_tokens = len(generation.prepared.token_ids)
    usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
    start = {**_message_head(message_id, generation.model), "usage": usage}
    yield _event("message_start", {"message": start})
    blocks, called = _Blocks(), False
    try:
        async for piece in pieces:
            called = called or bool(piece.tool_calls)
            for line in blocks.feed(piece):
                yield line
    except Exception as exc:
        status = exc.status_code if isinstance(exc, ServerError) else 500
        message = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
        yield _event("error", {"error": anthropic_error(status, message)["error"]})
        return
    for line in blocks.close():
        yield line
    if blocks.count == 0:
        yield _event("ping", {})
    stats = generation.stats
    assert stats is not None
    delta = _stop_fields(stats, called)
    yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": stats.completion_tokens}})
    yield _event("message_stop", {})
