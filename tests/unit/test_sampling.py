"""Sampling settings applied to one row of logits (runners/sampling.py): greedy, seeds, top-k,
top-p, min-p and the penalties, each on a vocabulary of a few tokens."""

from __future__ import annotations

import torch

from runners.base import SamplingOptions
from runners.sampling import make_generator, next_token

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5])  # token 1 is the most likely, then 2


def pick(options: SamplingOptions, logits: torch.Tensor = LOGITS, context=(), generated=()) -> int:
    return next_token(logits.clone(), options, list(context), list(generated), make_generator(options, "cpu"))


def test_temperature_zero_is_greedy() -> None:
    assert pick(SamplingOptions(temperature=0)) == 1


def test_a_seed_reproduces_the_same_choices() -> None:
    options = SamplingOptions(temperature=1.0, seed=1234)
    generator = make_generator(options, "cpu")
    first = [next_token(LOGITS.clone(), options, [], [], generator) for _ in range(20)]
    generator = make_generator(options, "cpu")
    assert [next_token(LOGITS.clone(), options, [], [], generator) for _ in range(20)] == first


def test_top_k_one_and_a_tiny_top_p_keep_only_the_best_token() -> None:
    for options in (SamplingOptions(temperature=5.0, top_k=1), SamplingOptions(temperature=5.0, top_p=1e-9)):
        assert {pick(SamplingOptions(**{**vars(options), "seed": s})) for s in range(30)} == {1}


def test_min_p_drops_tokens_far_below_the_best() -> None:
    logits = torch.tensor([10.0, 9.9, -10.0, -10.0])
    chosen = {pick(SamplingOptions(temperature=1.0, min_p=0.5, seed=s), logits) for s in range(50)}
    assert chosen == {0, 1}


def test_the_repeat_penalty_turns_greedy_away_from_tokens_in_the_window() -> None:
    options = SamplingOptions(temperature=0, repeat_penalty=2.0, repeat_last_n=2)
    assert pick(options, context=[1]) == 2  # 3.0 / 2 < 2.0
    assert pick(options, context=[1, 0, 3]) == 1  # token 1 fell out of the last-2 window


def test_presence_and_frequency_penalties_count_generated_tokens() -> None:
    assert pick(SamplingOptions(temperature=0, presence_penalty=1.5), generated=[1]) == 2
    frequency = SamplingOptions(temperature=0, frequency_penalty=0.4)
    assert pick(frequency, generated=[1]) == 1  # 3.0 - 0.4 > 2.0
    assert pick(frequency, generated=[1, 1, 1]) == 2  # 3.0 - 1.2 < 2.0
