"""Greedy decoding of a causal LM token by token over its own cache: the same loop for the stock
model and for one with the CPU fast paths, whose tokens the tests compare."""

from __future__ import annotations

from typing import Any

import torch

PROMPT_IDS = (5, 9, 11, 40, 3, 17)


def greedy_tokens(model: Any, steps: int = 16) -> list[int]:
    """PROMPT_IDS and the `steps` tokens the model picks after them, one forward pass each."""
    tokens = list(PROMPT_IDS)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]))
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values)
    return tokens
