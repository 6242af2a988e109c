"""The original server's own API: /chat (JSON or SSE) and /models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from api.deps import get_runtime
from api.errors import stream_error
from api.ollama import final_stats
from api.streaming import SSE_MEDIA_TYPE, sse_event, started_stream, stream_generation
from jobs.models import iso_utc
from runners.base import Chunk, GenerationRequest, SamplingOptions
from runners.generation import Generation, start_generation
from runners.local_cache import list_local
from runtime import Runtime

router = APIRouter(tags=["native"])


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    stream: bool = False


@router.post("/chat")
async def chat(body: ChatRequest, runtime: Runtime = Depends(get_runtime)) -> Any:
    request = GenerationRequest(
        messages=[m.model_dump() for m in body.messages],
        options=SamplingOptions(max_tokens=body.max_tokens, temperature=body.temperature),
    )
    generation = await start_generation(runtime.pool, body.model, request)
    if body.stream:
        chunks = await started_stream(generation.stream())
        return stream_generation(generation, _sse_events(generation, chunks), SSE_MEDIA_TYPE)
    text, stats = await generation.collect()
    return {
        "model": body.model,
        "created_at": iso_utc(generation.created_at),
        "message": {"role": "assistant", "content": text},
        "done": True,
        **final_stats(stats),
    }


async def _sse_events(generation: Generation, chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            if chunk.text:
                yield sse_event({"delta": {"content": chunk.text}, "done": False})
    except Exception as exc:  # after the first byte the status is sent: report in-band
        yield stream_error(exc, "native")
        return
    assert generation.stats is not None
    yield sse_event({"delta": {}, "done": True, **final_stats(generation.stats)})


@router.get("/models")
async def models(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    listed = []
    for local in await asyncio.to_thread(list_local):
        entry = runtime.pool.get_loaded(local.ref.name)
        runner = entry.runner if entry else None
        listed.append({
            "model": local.ref.name,
            "loaded": entry is not None,
            "backend": entry.backend.name if entry else None,
            "backend_reason": entry.backend.reason if entry else None,
            "size_bytes": local.size_bytes,
            "local_path": str(local.path),
            "load_duration": entry.load_duration_ns if entry else None,
            "quantization": runner.precision.mode if runner else None,
            "quantization_reason": runner.precision.reason if runner else None,
            "memory_bytes": entry.memory_bytes if entry else None,
        })
    return {"models": listed}
