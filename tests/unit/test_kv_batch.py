"""The transformers scheduler's KV-batch bookkeeping (runners/batching.py) on tiny tensors: two
caches of different lengths merge right-aligned (the shorter left-padded and masked out), and
rows leave again with the columns that became padding for everyone dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from runners.batching import KVBatch


@dataclass(eq=False)
class Row:
    """Stands in for a decoding Sequence: KVBatch reads only its prompt's length."""

    prompt_ids: list[int]


def cache_of(values: list[float]) -> DynamicCache:
    """A one-layer cache for one sequence: position i holds keys (v, v) and values (-v, -v)."""
    keys = torch.tensor(values).repeat_interleave(2).reshape(1, 1, len(values), 2)
    cache = DynamicCache()
    cache.update(keys, -keys, 0)
    return cache


def batch_of(values: list[float]) -> tuple[KVBatch, Row]:
    row = Row(list(range(len(values))))
    return KVBatch(row, cache_of(values)), row  # type: ignore[arg-type]


def layer_keys(batch: KVBatch) -> list[list[float]]:
    return batch.cache.layers[0].keys[:, 0, :, 0].tolist()


def test_merging_left_pads_the_shorter_cache_and_masks_the_padding() -> None:
    short, a = batch_of([1.0, 2.0])
    long, b = batch_of([3.0, 4.0, 5.0, 6.0])
    assert KVBatch.mergeable(short.cache)
    short.absorb(long)
    assert short.rows == [a, b]
    assert layer_keys(short) == [[0.0, 0.0, 1.0, 2.0], [3.0, 4.0, 5.0, 6.0]]
    assert short.cache.layers[0].values[0, 0, :, 0].tolist() == [0.0, 0.0, -1.0, -2.0]
    assert short.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert short.positions.tolist() == [2, 4]  # each row's next position is its own length


def test_a_row_leaving_takes_its_cache_and_the_shared_padding_goes() -> None:
    batch, a = batch_of([1.0, 2.0])
    other, _ = batch_of([3.0, 4.0, 5.0, 6.0])
    batch.absorb(other)
    batch.keep([0])  # the long row finished: two columns are padding for every row left
    assert batch.rows == [a]
    assert layer_keys(batch) == [[1.0, 2.0]]
    assert batch.mask.tolist() == [[1, 1]] and batch.positions.tolist() == [2]


def test_keeping_every_row_changes_nothing_and_keeping_none_empties_the_batch() -> None:
    batch, _ = batch_of([1.0, 2.0])
    other, _ = batch_of([3.0])
    batch.absorb(other)
    before = layer_keys(batch)
    batch.keep([0, 1])
    assert layer_keys(batch) == before
    batch.keep([])
    assert batch.rows == []


def test_rows_prefilled_together_start_right_aligned_at_their_own_lengths() -> None:
    rows = [Row([1, 2, 3]), Row([4])]
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    batch = KVBatch.prefilled(rows, cache_of([1.0, 2.0, 3.0]), mask)  # type: ignore[arg-type]
    assert batch.positions.tolist() == [3, 1] and batch.rows == rows
