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


def _frequencies(options: SamplingOptions, logits: torch.Tensor, draws: int) -> torch.Tensor:
    generator = make_generator(options, "cpu")
    counts = torch.zeros(logits.numel())
    for _ in range(draws):
        counts[next_token(logits.clone(), options, [], [], generator)] += 1
    return counts / draws


def test_draws_follow_the_distribution_after_top_k_and_top_p() -> None:
    """4000 seeded draws: each token's frequency is its probability within the kept candidates."""
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1]))
    cases = [
        (SamplingOptions(temperature=1.0, seed=7), torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])),
        (SamplingOptions(temperature=1.0, top_k=2, seed=7), torch.tensor([0, 4 / 7, 3 / 7, 0, 0])),
        # top_p 0.8: 0.4 + 0.3 = 0.7 is short of it, so the 0.15 token stays too.
        (SamplingOptions(temperature=1.0, top_p=0.8, seed=7), torch.tensor([0, 0.4, 0.3, 0.15, 0]) / 0.85),
    ]
    for options, expected in cases:
        assert torch.allclose(_frequencies(options, logits, 4000), expected, atol=0.03), options


def test_top_p_over_a_flat_vocabulary_looks_past_the_first_candidates() -> None:
    """A nucleus wider than the first candidates looked at (1024): the whole vocabulary is sorted,
    and every draw still lands inside the nucleus."""
    probs = torch.full((5000,), 1.0)
    probs[:2000] = 2.0  # 2000 tokens hold 4000 / 7000 = 57% of the mass
    logits = torch.log(probs / probs.sum())
    options = SamplingOptions(temperature=1.0, top_p=0.5, seed=3)
    frequencies = _frequencies(options, logits, 3000)
    assert frequencies[2000:].sum() == 0
    assert (frequencies[:2000] > 0).sum() > 1024  # more distinct tokens than the first look held
