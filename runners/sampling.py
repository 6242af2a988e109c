"""Choosing the next token from logits with per-request settings.

Written per sequence so that one batch can mix requests with different settings.
"""

from __future__ import annotations

from collections import Counter

import torch

from runners.base import SamplingOptions

# Temperatures below this are greedy (as vLLM's _SAMPLING_EPS): dividing by a tinier one overflows.
GREEDY_BELOW = 1e-5


def make_generator(options: SamplingOptions, device: str) -> torch.Generator:
    """A private RNG per request: a seed reproduces its output whatever else runs concurrently."""
    generator = torch.Generator(device=device)
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(options.seed)
    return generator


def next_token(
    logits: torch.Tensor,
    options: SamplingOptions,
    context: list[int],
    generated: list[int],
    generator: torch.Generator,
) -> int:
    """Pick the next token from one row of logits (shape [vocab]).

    `context` is the prompt plus generated tokens (for the repeat penalty window); `generated`
    alone drives OpenAI-style presence and frequency penalties.
    """
    logits = logits.float()
    if options.repeat_penalty != 1.0 and options.repeat_last_n != 0:
        window = context if options.repeat_last_n < 0 else context[-options.repeat_last_n :]
        if window:
            ids = torch.tensor(sorted(set(window)), device=logits.device)
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / options.repeat_penalty, seen * options.repeat_penalty)
    if generated and (options.presence_penalty or options.frequency_penalty):
        counts = Counter(generated)
        ids = torch.tensor(list(counts), device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= options.presence_penalty + options.frequency_penalty * freq
    if options.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / options.temperature
    if options.top_k > 0 and options.top_k < logits.numel():
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.min_p > 0:
        probs = probs.masked_fill(probs < options.min_p * probs.max(), 0.0)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= options.top_p
        drop[0] = False  # a top_p below float32's smallest number compares as 0 and would drop it too
        probs = probs.clone()
        probs[order[drop]] = 0.0
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
