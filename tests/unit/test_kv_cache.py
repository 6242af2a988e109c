"""The transformers scheduler's slot cache (runners/kv_cache.py) on tiny tensors: a prefill's rows
land at column 0 of their slots, a decode step writes each row's token at that row's own length and
masks the others' unused tail, rows leave by compaction, growth keeps the contents, and the mask's
kind follows the attention implementation's registered mask function."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from runners.kv_cache import SlotCache, decode_mask, mask_kind


def prefill_of(rows: list[list[float]]) -> DynamicCache:
    """A one-layer, one-head cache of a left-padded batch prefill: keys (v, v), values (-v, -v)."""
    keys = torch.tensor(rows).repeat_interleave(2, dim=1).reshape(len(rows), 1, len(rows[0]), 2)
    cache = DynamicCache()
    cache.update(keys, -keys, 0)
    return cache


def slot_keys(cache: SlotCache, rows: int, width: int) -> list[list[float]]:
    return cache.layers[0].keys[:rows, 0, :width, 0].tolist()


def test_prefilled_rows_start_at_column_zero_of_their_slots() -> None:
    prefill = prefill_of([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])  # row 0 was left-padded: one pad column
    cache = SlotCache.like(prefill)
    cache.write_prefill(0, prefill, 0, 2)
    cache.write_prefill(1, prefill, 1, 3)
    assert slot_keys(cache, 2, 3) == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert cache.layers[0].values[1, 0, :3, 0].tolist() == [-3.0, -4.0, -5.0]


def test_a_decode_step_writes_each_row_at_its_own_length() -> None:
    prefill = prefill_of([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    cache = SlotCache.like(prefill)
    cache.write_prefill(0, prefill, 0, 2)
    cache.write_prefill(1, prefill, 1, 3)
    lengths = torch.tensor([2, 3])
    cache.begin_step(lengths, 4)
    new = torch.tensor([7.0, 8.0]).repeat_interleave(2).reshape(2, 1, 1, 2)
    keys, values = cache.update(new, -new, 0)
    assert keys[:, 0, :, 0].tolist() == [[1.0, 2.0, 7.0, 0.0], [3.0, 4.0, 5.0, 8.0]]
    assert values[:, 0, :, 0].tolist() == [[-1.0, -2.0, -7.0, 0.0], [-3.0, -4.0, -5.0, -8.0]]
    assert cache.get_seq_length() == 3
    assert decode_mask(lengths, 4, torch.float32, True)[:, 0, 0].tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]
    additive = decode_mask(lengths, 4, torch.float32, False)[:, 0, 0]
    assert additive[0].tolist() == [0.0, 0.0, 0.0, torch.finfo(torch.float32).min]
    assert additive[1].tolist() == [0.0] * 4


def test_rows_leave_by_compaction_and_growth_keeps_the_contents() -> None:
    prefill = prefill_of([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cache = SlotCache.like(prefill)
    for row in range(3):
        cache.write_prefill(row, prefill, row, 2)
    cache.compact([0, 2], 2)  # the middle row finished
    assert slot_keys(cache, 2, 2) == [[1.0, 2.0], [5.0, 6.0]]
    cache.ensure(5, 300)  # rows double at least, columns grow in blocks
    assert cache.layers[0].keys.shape[0] >= 5 and cache.layers[0].keys.shape[2] == 512
    assert slot_keys(cache, 2, 2) == [[1.0, 2.0], [5.0, 6.0]]


class Config:
    """Stands in for a model config: mask_kind reads the text config's attention implementation."""

    def __init__(self, implementation: str) -> None:
        self._attn_implementation = implementation

    def get_text_config(self) -> Config:
        return self


def test_the_mask_kind_follows_the_implementations_mask_function() -> None:
    AttentionMaskInterface.register("slot_cache_test_attention", sdpa_mask)  # a custom kernel, SDPA's mask
    assert mask_kind(Config("sdpa")) == "boolean"
    assert mask_kind(Config("slot_cache_test_attention")) == "boolean"
    assert mask_kind(Config("eager")) == "additive"
    assert mask_kind(Config("flash_attention_2")) is None
    assert mask_kind(Config("flex_attention")) is None
