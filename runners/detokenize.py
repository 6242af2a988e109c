"""Streaming text out of token ids: incremental decoding and stop sequences."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Decodes one token at a time, emitting only text that is final.

    Decoding a window (prefix_offset..) instead of single tokens keeps multi-byte characters and
    tokenizer-specific spacing right; a trailing U+FFFD means an unfinished character, held back.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        skip = self._skip_special
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        text = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""


class StopMatcher:
    """Cuts the stream at the first stop sequence, which is never emitted.

    Text that could still become a stop sequence is held back until it can't.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None  # the stop sequence that ended the stream, once one has

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was hit)."""
        if not self._stops:
            return delta, False
        self._pending += delta
        if any(s in self._pending for s in self._stops):
            # The earliest match wins; Anthropic's and vLLM's APIs report which sequence it was.
            at, self.matched = min((i, s) for s in self._stops if (i := self._pending.find(s)) >= 0)
            text, self._pending = self._pending[:at], ""
            return text, True
        hold = max((self._partial_match(s) for s in self._stops), default=0)
        cut = len(self._pending) - hold
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _partial_match(self, stop: str) -> int:
        """Length of the longest suffix of the pending text that is a prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0
