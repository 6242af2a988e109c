"""The original server's own API: /chat (JSON or SSE) and /models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from api.deps import get_runtime
from api.errors import stream_error
from api.ollama import ChatPieces, final_stats
from api.ollama_schemas import Message as OllamaMessage
from api.ollama_schemas import Think, thinking_switches
from api.streaming import SSE_MEDIA_TYPE, sse_event, started_stream, stream_generation
from api.strict_json import StrictJSONRoute
from api.tool_schemas import ToolChoiceParam, ToolParam, tool_choice_value, tool_dicts
from jobs.models import iso_utc
from runners.base import GenerationRequest, OutputDelta, SamplingOptions, left_out
from runners.generation import Generation, start_generation
from runners.local_cache import list_local
from runtime import Runtime

router = APIRouter(tags=["native"], route_class=StrictJSONRoute)


class Message(OllamaMessage):
    content: str | None  # required, as in the original API (null on a turn that only called tools)


class ChatRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    stream: bool = False
    # The same tools and thinking as Ollama's /api/chat (tool_choice as OpenAI's).
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam = None
    think: Think = None


@router.post("/chat")
async def chat(body: ChatRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    tools = tool_dicts(body.tools)
    request = GenerationRequest(
        messages=[m.for_template(i) for i, m in enumerate(body.messages)],
        options=SamplingOptions(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            defaulted=left_out(**dict.fromkeys(body.model_fields_set & {"max_tokens", "temperature"}, True)),
        ),
        tools=tools,
        tool_choice=tool_choice_value(body.tool_choice, tools),
        template_kwargs=thinking_switches(body.think),
        require_thinking=bool(body.think),
    )
    generation = await start_generation(runtime.pool, body.model, request, presets=runtime.presets)
    pieces = ChatPieces(show_thinking=body.think is not False)
    if body.stream:
        deltas = await started_stream(generation.stream())
        return stream_generation(generation, _sse_events(generation, deltas, pieces), SSE_MEDIA_TYPE)
    done = await generation.collect()
    return {
        "model": body.model,
        "created_at": iso_utc(generation.created_at),
        **pieces.final(done),
        "done": True,
        **final_stats(done.stats),
    }


async def _sse_events(
    generation: Generation, deltas: AsyncIterator[OutputDelta], pieces: ChatPieces
) -> AsyncIterator[str]:
    try:
        async for delta in deltas:
            fields = pieces.piece(delta)
            if fields is not None:
                message = {k: v for k, v in fields["message"].items() if k != "role" and v != ""}
                yield sse_event({"delta": message, "done": False})
    except Exception as exc:  # after the first byte the status is sent: report in-band
        yield stream_error(exc, "native")
        return
    assert generation.stats is not None
    yield sse_event({"delta": {}, "done": True, **final_stats(generation.stats)})


@router.get("/models")
async def models(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    listed = []
    for local in await asyncio.to_thread(list_local):
        entry = runtime.pool.snapshot_of(local.ref.name)
        listed.append(
            {
                "model": local.ref.name,
                "loaded": entry is not None,
                "backend": entry.backend if entry else None,
                "backend_reason": entry.backend_reason if entry else None,
                "size_bytes": local.size_bytes,
                "local_path": str(local.path),
                "load_duration": entry.load_duration_ns if entry else None,
                "quantization": entry.precision if entry else None,
                "quantization_reason": entry.precision_reason if entry else None,
                "memory_bytes": entry.memory_bytes if entry else None,
            }
        )
    return {"models": listed}
