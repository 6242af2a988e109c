"""Fitting text to the context before tokenizing it (runners/limits.py), and the token ids of
texts to embed (runners/prepare.py), with a stand-in tokenizer of a known vocabulary."""

from __future__ import annotations

import pytest

from errors import InvalidRequest
from runners.limits import fit_prompt, longest_token_chars
from runners.prepare import prepare_embedding


class CharTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character, ids from 1 (0 is BOS or
    nothing), with a special token of 5 characters in its vocabulary."""

    def __init__(self, bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    def get_vocab(self) -> dict[str, int]:
        return {"a": 1, "b": 2, "<eos>": 3}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_the_longest_vocabulary_entry_bounds_the_characters_per_token() -> None:
    assert longest_token_chars(CharTokenizer()) == 5


def test_a_text_that_may_fit_is_kept_and_one_that_cannot_is_cut_or_refused() -> None:
    tokenizer = CharTokenizer()
    assert fit_prompt(tokenizer, "a" * 20, 4) == "a" * 20  # 4 tokens x 5 characters
    assert fit_prompt(tokenizer, "a" * 21, 4, truncate=True) == "a" * 20
    with pytest.raises(InvalidRequest, match="21 characters"):
        fit_prompt(tokenizer, "a" * 21, 4)


def test_embedding_inputs_are_cut_to_the_context_or_refused() -> None:
    tokenizer = CharTokenizer()
    assert prepare_embedding(tokenizer, ["ab", "b"], 4, truncate=False) == [[1, 2], [2]]
    assert prepare_embedding(tokenizer, ["ababab"], 4, truncate=True) == [[1, 2, 1, 2]]
    with pytest.raises(InvalidRequest, match="input is 6 tokens; the model's context is 4 tokens"):
        prepare_embedding(tokenizer, ["ababab"], 4, truncate=False)


def test_an_empty_text_embeds_from_bos_else_eos_and_token_id_0_is_a_real_token() -> None:
    assert prepare_embedding(CharTokenizer(bos_token_id=0, eos_token_id=3), [""], 4, truncate=True) == [[0]]
    assert prepare_embedding(CharTokenizer(eos_token_id=3), [""], 4, truncate=True) == [[3]]
