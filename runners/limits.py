"""Bounds a request must meet before any expensive work starts.

`fit_prompt` refuses (or cuts) a prompt by its length in characters before it is tokenized: no
token of a vocabulary covers more characters than its longest entry, so a text longer than
context × that many characters cannot fit, whatever its tokens turn out to be. Tokenizing a
multi-megabyte text would otherwise take the worker's memory and minutes first.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from errors import InvalidRequest

# Ranges of the sampling options every dialect shares (each dialect's schema applies them).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch's and vLLM's generators take
TOP_K_MAX = 2**31 - 1  # engines keep top_k in 32-bit tensors
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0  # presence and frequency penalties, as OpenAI and vLLM
REPEAT_PENALTY_MIN, REPEAT_PENALTY_MAX = 0.01, 2.0  # beyond these, penalized logits overflow float32

_longest: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def longest_token_chars(tokenizer: Any) -> int:
    """Characters in the longest vocabulary entry (added and special tokens included); computed
    once per tokenizer. Byte-level vocabularies spell each byte as one character, so this bounds
    the characters one token can decode to."""
    with _lock:
        cached = _longest.get(tokenizer)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1)
        try:
            with _lock:
                _longest[tokenizer] = cached
        except TypeError:  # a tokenizer that cannot be weakly referenced: measured on every call
            pass
    return max(cached, 1)


def fit_prompt(tokenizer: Any, text: str, context_length: int, *, truncate: bool = False) -> str:
    """`text` if it may fit in `context_length` tokens; cut to the most that may (`truncate`);
    else InvalidRequest (400) without tokenizing it."""
    most = context_length * longest_token_chars(tokenizer)
    if len(text) <= most:
        return text
    if truncate:
        return text[:most]
    raise InvalidRequest(
        f"input is {len(text)} characters, more than the model's context of {context_length} "
        f"tokens can hold (at most {most} characters with this tokenizer)"
    )
