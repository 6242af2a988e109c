"""Choosing the next token from logits with per-request settings.

Written per sequence so that one batch can mix requests with different settings.
"""

from __future__ import annotations

from collections import Counter

import torch

from runners.base import SamplingOptions

# Over the whole vocabulary, top_p looks for its nucleus among this many best tokens first.
_NUCLEUS_PROBE = 1024
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
            in_window = torch.tensor(sorted(set(window)), device=logits.device)
            seen = logits[in_window]
            logits[in_window] = torch.where(seen > 0, seen / options.repeat_penalty, seen * options.repeat_penalty)
    if generated and (options.presence_penalty or options.frequency_penalty):
        counts = Counter(generated)
        counted = torch.tensor(list(counts), device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[counted] -= options.presence_penalty + options.frequency_penalty * freq
    if options.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / options.temperature
    ids: torch.Tensor | None = None  # the candidates' token ids (best first); None: the whole vocabulary
    if 0 < options.top_k < logits.numel():
        logits, ids = torch.topk(logits, options.top_k)
    probs = torch.softmax(logits, dim=-1)
    if options.min_p > 0:
        probs = probs.masked_fill(probs < options.min_p * probs.max(), 0.0)
    if options.top_p < 1.0:
        probs, ids = _nucleus(probs, ids, options.top_p)
    index = _draw(probs, generator)
    return index if ids is None else int(ids[index])


def _nucleus(probs: torch.Tensor, ids: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest prefix of the candidates, best first, whose mass reaches top_p (the first always
    stays), with its token ids. Candidates from top_k are sorted already; over the whole vocabulary
    the best _NUCLEUS_PROBE are looked at first, and the vocabulary is sorted only when their mass
    falls short (sorting 150k probabilities costs 9 ms a token on a CPU core)."""
    if ids is not None:
        best, order = probs, ids
    else:
        best, order = torch.topk(probs, min(_NUCLEUS_PROBE, probs.numel()))
        if best.numel() < probs.numel() and float(best.sum()) < top_p:
            best, order = torch.sort(probs, descending=True)
    # A token stays while the mass before it is below top_p; a top_p below float32's smallest number
    # compares as 0 and would drop the first token too.
    keep = max(1, int((torch.cumsum(best, dim=-1) - best < top_p).sum()))
    return best[:keep], order[:keep]


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn in proportion to `probs` (not necessarily summing to 1): the inverse of the
    cumulative distribution at one uniform number. torch.multinomial takes 4 ms for a 150k
    vocabulary on a CPU core; this takes 0.2."""
    cumulative = torch.cumsum(probs, dim=-1)
    point = torch.rand(1, generator=generator, device=probs.device) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))
    if index < probs.numel():
        return index
    return int(probs.nonzero()[-1])  # rounding put the point at the very end: the last possible token
