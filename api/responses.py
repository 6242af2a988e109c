"""OpenAI's Responses API: POST /v1/responses (JSON and SSE), GET and DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items.

What the OpenAI Agents SDK and newer OpenAI clients speak. The input (with the stored conversation
of `previous_response_id` before it) becomes chat messages and runs the shared generation path;
this module shapes the parsed output into output items (`reasoning`, `message`, `function_call`)
and OpenAI's semantic stream events. With `store` (the default) the response and its conversation
go to the job database (jobs/responses_store.py), so a conversation continues after a restart and
on any replica that shares DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.deps import get_runtime
from api.errors import openai_error
from api.responses_schemas import ResponsesRequest, input_items
from api.streaming import SSE_MEDIA_TYPE, started_stream, stream_generation
from errors import NotFound, ServerError
from jobs.responses_store import StoredResponse
from runners import structured
from runners.base import GenerationRequest, OutputDelta, ResponseFormat, SamplingOptions, left_out
from runners.generation import Generation, start_generation
from runtime import Runtime

router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses")
async def create_response(body: ResponsesRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        previous = await asyncio.to_thread(runtime.responses.get, body.previous_response_id)
        if previous is None:
            raise NotFound(
                f"Previous response with id '{body.previous_response_id}' not found.", param="previous_response_id"
            )
        history = previous.conversation
    conversation = history + body.input_messages()
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    request = GenerationRequest(
        messages=system + conversation,
        options=SamplingOptions(
            max_tokens=body.max_output_tokens,  # None: until the context is full, as on chat completions
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            defaulted=left_out(
                max_tokens=body.max_output_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
            ),
        ),
        response_format=await _response_format(body),
        tools=body.tool_list(),
        tool_choice=body.tool_choice_value(),
        parallel_tool_calls=body.parallel_tool_calls,
        template_kwargs=body.template_kwargs(),
    )
    generation = await start_generation(runtime.pool, body.model, request, presets=runtime.presets)
    response = _Response(f"resp_{uuid.uuid4().hex}", body, generation)
    pieces = await started_stream(generation.stream())

    async def finish() -> None:
        if body.store:
            row = StoredResponse(
                id=response.id,
                model=body.model,
                previous_response_id=body.previous_response_id,
                response=response.snapshot(),
                conversation=conversation + response.messages(),
                input_items=input_items(body.input),
            )
            await asyncio.to_thread(runtime.responses.add, row)

    if body.stream:
        return stream_generation(generation, _events(response, pieces, finish), SSE_MEDIA_TYPE)
    try:
        async for piece in pieces:
            response.feed(piece)
    finally:
        await generation.close()  # also when the client went away mid-generation
    response.close()
    await finish()
    return JSONResponse(response.snapshot())


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    row = await asyncio.to_thread(runtime.responses.get, response_id)
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return row.response


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    runtime: Runtime = Depends(get_runtime),
    order: Literal["asc", "desc"] = "desc",
    limit: int = Query(20, ge=1, le=100),
    after: str | None = None,
) -> dict[str, Any]:
    """The input items of a stored response (not those of the responses before it), a page at a time."""
    row = await asyncio.to_thread(runtime.responses.get, response_id)
    if row is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    items = row.input_items if order == "asc" else row.input_items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFound(f"Input item with id '{after}' not found.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    if not await asyncio.to_thread(runtime.responses.delete, response_id):
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return {"id": response_id, "object": "response", "deleted": True}


async def _response_format(body: ResponsesRequest) -> ResponseFormat | None:
    """text.format as an output constraint, checked before any model loads (a bad schema is a 400)."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    response_format = ResponseFormat("json_schema", fmt.schema_) if fmt.schema_ is not None else ResponseFormat("json")
    await asyncio.to_thread(structured.validate, response_format)
    return response_format


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Response:
    """One response as its output arrives: output items opened and closed as parsed pieces come
    (a reasoning item, a message, one function_call per call), the stream events that says so,
    and the response object at any point."""

    def __init__(self, response_id: str, body: ResponsesRequest, generation: Generation) -> None:
        self.id = response_id
        self.body = body
        self.generation = generation
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._open_call: int | None = None
        self._finished_at: int | None = None

    # -- output items ----------------------------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.output.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": dict(item)})
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"] = [part]
            events.append({"type": "response.content_part.added", **self._where(), "part": dict(part)})
        elif item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": ""}]
        return events

    def _item(self) -> dict[str, Any]:
        """The output item now open (`_add` opened one before any piece is written to it)."""
        assert self._open is not None
        return self._open

    def _where(self, content: bool = True) -> dict[str, Any]:
        where = {"item_id": self._item()["id"], "output_index": len(self.output) - 1}
        return {**where, "content_index": 0} if content else where

    def feed(self, piece: OutputDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if piece.reasoning:
            if self._open is None or self._open["type"] != "reasoning":
                events += self._add({"id": _new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress"})
            self._item()["content"][0]["text"] += piece.reasoning
            events.append({"type": "response.reasoning_text.delta", **self._where(), "delta": piece.reasoning})
        if piece.content:
            if self._open is None or self._open["type"] != "message":
                events += self._add(
                    {
                        "id": _new_id("msg"),
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                )
            self._item()["content"][0]["text"] += piece.content
            events.append(
                {"type": "response.output_text.delta", **self._where(), "delta": piece.content, "logprobs": []}
            )
        for call in piece.tool_calls:
            if self._open is None or self._open["type"] != "function_call" or self._open_call != call.index:
                events += self._add(
                    {
                        "id": _new_id("fc"),
                        "type": "function_call",
                        "status": "in_progress",
                        "call_id": call.id or _new_id("call"),
                        "name": call.name or "",
                        "arguments": "",
                    }
                )
                self._open_call = call.index
            if call.arguments:
                self._item()["arguments"] += call.arguments
                events.append(
                    {"type": "response.function_call_arguments.delta", **self._where(False), "delta": call.arguments}
                )
        return events

    def close(self) -> list[dict[str, Any]]:
        """Finish the open item: its `.done` events, then `response.output_item.done`."""
        item, self._open, self._open_call = self._open, None, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        events: list[dict[str, Any]] = []
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events += [
                {
                    "type": "response.output_text.done",
                    **where,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": [],
                },
                {"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)},
            ]
        elif item["type"] == "reasoning":
            events.append(
                {
                    "type": "response.reasoning_text.done",
                    **where,
                    "content_index": 0,
                    "text": item["content"][0]["text"],
                }
            )
        elif item["type"] == "function_call":
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        events.append({"type": "response.output_item.done", "output_index": where["output_index"], "item": dict(item)})
        return events

    # -- the response object and the conversation it ends ----------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The response object: in progress until the generation has finished."""
        body, stats = self.body, self.generation.stats
        status, incomplete = "in_progress", None
        if stats is not None:
            status = "incomplete" if stats.finish_reason == "length" else "completed"
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        fmt = {"type": "text"}
        if body.text and body.text.format:
            fmt = body.text.format.model_dump(by_alias=True, exclude_none=True)
        usage = None
        if stats is not None:
            usage = {
                "input_tokens": stats.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": stats.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": self._completed_at(),
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": [dict(item) for item in self.output] if stats is not None else [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt},
            "tool_choice": body.tool_choice_echo(),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def _completed_at(self) -> int | None:
        """When the generation finished: taken once, so every copy of the response agrees."""
        if self.generation.stats is not None and self._finished_at is None:
            self._finished_at = int(time.time())
        return self._finished_at

    def messages(self) -> list[dict[str, Any]]:
        """The output as the assistant turn a later `previous_response_id` continues from."""
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        for item in self.output:
            if item["type"] == "message":
                turn["content"] += item["content"][0]["text"]
            elif item["type"] == "reasoning":
                turn["reasoning_content"] = item["content"][0]["text"]
            elif item["type"] == "function_call":
                turn.setdefault("tool_calls", []).append(
                    {
                        "id": item["call_id"],
                        "type": "function",
                        "function": {"name": item["name"], "arguments": _arguments(item["arguments"])},
                    }
                )
        return [turn]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _events(response: _Response, pieces: AsyncIterator[OutputDelta], finish: Any) -> AsyncIterator[str]:
    """OpenAI's event sequence: response.created, response.in_progress, the items' events,
    response.completed (response.incomplete when max_output_tokens ran out); every event numbered.
    A failure after the first byte becomes an `error` event."""
    sequence = 0

    def numbered(event: dict[str, Any]) -> str:
        nonlocal sequence
        sequence += 1
        return _sse({**event, "sequence_number": sequence - 1})

    yield numbered({"type": "response.created", "response": response.snapshot()})
    yield numbered({"type": "response.in_progress", "response": response.snapshot()})
    try:
        async for piece in pieces:
            for event in response.feed(piece):
                yield numbered(event)
        for event in response.close():
            yield numbered(event)
        await finish()
    except Exception as exc:
        error = (
            openai_error(exc.message, exc.error_type, exc.param)
            if isinstance(exc, ServerError)
            else openai_error(f"{type(exc).__name__}: {exc}", "server_error")
        )["error"]
        yield numbered({"type": "error", "code": error["type"], "message": error["message"], "param": error["param"]})
        return
    snapshot = response.snapshot()
    yield numbered({"type": f"response.{snapshot['status']}", "response": snapshot})
