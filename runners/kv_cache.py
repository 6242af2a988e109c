"""A slotted KV cache for the continuous-batching decode loop of the transformers engine.

Each running sequence owns one row ("slot") of preallocated key/value buffers per layer; its tokens
fill the row from column 0, in position order. A decode step writes every row's new key/value in
place at that row's own length and attends over the first `width` columns (the longest row plus
the new token), with a 4-D mask hiding each shorter row's unused tail. Compared with a
DynamicCache holding the whole batch (torch.cat of every layer's keys and values per token, and a
re-pad of the whole cache whenever a request joins or leaves) a step copies only the new token's
key/value, a joining request copies only its own prefill, and a leaving one moves the rows behind it.

The buffers grow in blocks (rows and columns) as the batch and its longest sequence grow, so a
model with a long context does not reserve it all up front.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_COLUMN_BLOCK = 256  # columns added at a time: growth (a copy of the cache) every 256 tokens at most


class SlotLayer(CacheLayerMixin):
    """One layer's key/value buffers, [rows, kv heads, columns, head dim]; written by SlotCache."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.width = 0  # columns in use (set per forward pass by SlotCache)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("SlotCache writes its layers itself")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_seq_length(self) -> int:
        return max(self.width - 1, 0)

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The KV cache of every mergeable running sequence of one model (see the module docstring).

    `begin_step(lengths)` prepares one decode pass for the first len(lengths) rows (each writes its
    new token at column lengths[i]); the model's attention layers then call `update`."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        empty = [
            SlotLayer(
                torch.zeros(0, kv_heads, 0, head_dim, dtype=dtype, device=device),
                torch.zeros(0, kv_heads, 0, head_dim, dtype=dtype, device=device),
            )
            for _ in range(layers)
        ]
        super().__init__(layers=empty)
        self._rows = torch.zeros(0, dtype=torch.long, device=device)
        self._write = self._rows
        self._width = 0

    @classmethod
    def like(cls, prefilled: Any) -> SlotCache:
        """An empty slot cache shaped like a prefill's DynamicCache (same layers, heads, dtype)."""
        first = prefilled.layers[0].keys
        return cls(len(prefilled.layers), first.shape[1], first.shape[3], first.dtype, first.device)

    @property
    def device(self) -> torch.device:
        return self.layers[0].keys.device

    def ensure(self, rows: int, columns: int) -> None:
        """Grow the buffers (keeping their contents) to hold at least `rows` x `columns`. Each layer
        is checked on its own: a growth that failed half-way (out of memory) is completed next time."""
        for layer in self.layers:
            have_rows, have_columns = layer.keys.shape[0], layer.keys.shape[2]
            if rows <= have_rows and columns <= have_columns:
                continue
            new_rows = max(rows, 2 * have_rows, 1) if rows > have_rows else have_rows  # doubling: joins copy rarely
            new_columns = max(have_columns, -(-columns // _COLUMN_BLOCK) * _COLUMN_BLOCK)
            for name in ("keys", "values"):
                old = getattr(layer, name)
                b, h, _, d = old.shape
                grown = old.new_zeros(new_rows, h, new_columns, d)
                grown[:b, :, : old.shape[2]] = old
                setattr(layer, name, grown)

    def write_prefill(self, row: int, prefilled: Any, source_row: int, length: int) -> None:
        """Copy the last `length` positions of row `source_row` of a prefill's cache into slot `row`
        (a left-padded batch prefill keeps each prompt at the right end of its row)."""
        self.ensure(row + 1, length + 1)
        for mine, theirs in zip(self.layers, prefilled.layers, strict=True):
            width = theirs.keys.shape[2]
            mine.keys[row, :, :length] = theirs.keys[source_row, :, width - length :]
            mine.values[row, :, :length] = theirs.values[source_row, :, width - length :]

    def compact(self, indices: list[int], width: int) -> None:
        """Keep the rows `indices` (in that order) as rows 0..len(indices)-1; `width` columns matter."""
        if indices == list(range(len(indices))):
            return
        index = torch.tensor(indices, device=self.device)
        for layer in self.layers:
            layer.keys[: len(indices), :, :width] = layer.keys[index, :, :width]
            layer.values[: len(indices), :, :width] = layer.values[index, :, :width]

    def begin_step(self, lengths: torch.Tensor, width: int) -> None:
        """The next forward pass decodes one token for rows 0..len(lengths)-1, row i writing at
        column lengths[i]; attention reads the first `width` columns."""
        self.ensure(len(lengths), width)
        self._rows = torch.arange(len(lengths), device=self.device)
        self._write = lengths
        self._width = width
        for layer in self.layers:
            layer.width = width

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        rows = key_states.shape[0]
        layer.keys[self._rows, :, self._write] = key_states[:, :, 0]
        layer.values[self._rows, :, self._write] = value_states[:, :, 0]
        return layer.keys[:rows, :, : self._width], layer.values[:rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self._width - 1, 0)


def decode_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
    """The 4-D attention mask [rows, 1, 1, width] of one decode step: row i sees columns 0..lengths[i]
    (its past and its new token). Boolean (True: attend) for SDPA, additive (0 / dtype min) otherwise;
    transformers passes a 4-D mask through to the attention unchanged."""
    visible = torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None]
    if boolean:
        return visible[:, None, None, :]
    mask = torch.zeros(visible.shape, dtype=dtype, device=lengths.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None, None, :]


def mask_kind(config: Any) -> str | None:
    """How a decode step over a SlotCache passes its 4-D mask to this model's attention: "boolean"
    for an implementation whose mask function is transformers' `sdpa_mask` (SDPA, and any custom
    attention registered with it), "additive" for `eager_mask`; None for the others (flash, flex:
    they take no 4-D mask as given), whose sequences keep a cache each."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    function = ALL_MASK_ATTENTION_FUNCTIONS.get(config.get_text_config()._attn_implementation)
    return "boolean" if function is sdpa_mask else "additive" if function is eager_mask else None
