"""runners/collector.py: chunks a slow reader has not taken merge into one without losing what the
last of them says (a stop sequence lost there made Anthropic's stop_reason `end_turn` under load)."""

from __future__ import annotations

import asyncio

from runners.base import Chunk, TokenLogprob
from runners.collector import ChunkCollector, merge


def test_merge_keeps_the_later_chunks_finish_counts_and_stop_sequence() -> None:
    first = Chunk("Hel", token_ids=[1, 2], logprobs=[TokenLogprob("Hel", -0.5)])
    last = Chunk(
        "lo",
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=3,
        token_ids=[3],
        logprobs=[TokenLogprob("lo", -0.25)],
        stop_sequence=" r",
    )
    merged = merge(first, last)
    assert merged == Chunk(
        "Hello",
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=3,
        token_ids=[1, 2, 3],
        logprobs=[TokenLogprob("Hel", -0.5), TokenLogprob("lo", -0.25)],
        stop_sequence=" r",
    )


def test_a_reader_that_falls_behind_gets_one_chunk_with_the_stop_sequence() -> None:
    async def scenario() -> Chunk:
        collector = ChunkCollector()
        collector.put(Chunk("a", token_ids=[1]))
        collector.put(Chunk("b", token_ids=[2]))
        collector.put(Chunk("", finish_reason="stop", completion_tokens=2, stop_sequence="c"))
        await asyncio.sleep(0)  # the puts land on the loop before the reader comes
        return await collector.get()

    chunk = asyncio.run(scenario())
    assert (chunk.text, chunk.token_ids, chunk.finish_reason, chunk.stop_sequence) == ("ab", [1, 2], "stop", "c")
