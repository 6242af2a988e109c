"""One request's output between the decode thread and the event loop, bounded by merging.

The decode loop must never wait for one slow reader (it steps every request of the batch
together), so it cannot block on a full queue. Instead, like vLLM's RequestOutputCollector, chunks
the reader has not taken yet merge into one: at most one chunk (and an error) is ever pending per
request, whatever the reader's pace, and its text is bounded by the request's token budget.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from runners.base import Chunk


class ChunkCollector:
    """`put` from any thread; `get` on the event loop that created it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunk: Chunk | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: Chunk | BaseException) -> None:
        """Thread-safe: hands `item` to the event loop."""
        self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: Chunk | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = self._error or item
        elif self._chunk is None:
            self._chunk = item
        else:
            self._chunk = merge(self._chunk, item)
        self._ready.set()

    async def get(self) -> Chunk:
        """The output since the last call (raises the request's error once its output is taken)."""
        await self._ready.wait()
        if self._chunk is not None:
            chunk, self._chunk = self._chunk, None
            if self._error is None:
                self._ready.clear()
            return chunk
        assert self._error is not None
        raise self._error


def merge(first: Chunk, then: Chunk) -> Chunk:
    """Two consecutive chunks of one stream as one: text, tokens and logprobs joined, everything
    else (finish reason, counts, the stop sequence that ended it) the later one's."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = [*(first.logprobs or []), *(then.logprobs or [])]
    return replace(
        then,
        text=first.text + then.text,
        logprobs=logprobs,
        token_ids=[*first.token_ids, *then.token_ids],
    )
