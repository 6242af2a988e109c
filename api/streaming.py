"""Streaming responses that always give the model back, even if the client vanishes early."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from runners.generation import Generation, GenerationGroup

SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
T = TypeVar("T")


def stream_generation(
    generation: Generation | GenerationGroup, body: AsyncIterator[str], media_type: str
) -> StreamingResponse:
    """`body` formats `generation.stream()`; closing on completion releases the model lease even
    when the client disconnects before the first chunk (the generator would then never start)."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type=media_type, headers=headers, background=BackgroundTask(generation.close))


def sse_event(payload: dict[str, Any] | str) -> str:
    """One server-sent event carrying JSON (or a literal such as OpenAI's `[DONE]`)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def started_stream(stream: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """Start `stream` and wait for its first item before any response byte is sent, so errors
    that come before output (prompt too long, no FIM tokens, a bad schema) keep a real status code."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def chained() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    return chained()
