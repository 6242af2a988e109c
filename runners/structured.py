"""Constrained decoding with xgrammar (the library vLLM uses): JSON or a JSON schema, token by token.

Output is compact (no free-running whitespace): with weak or random models, grammars that allow
any whitespace let the model fill its whole budget with spaces.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from errors import InvalidRequest
from runners.base import ResponseFormat

if TYPE_CHECKING:  # xgrammar and torch load lazily: the API validates schemas without a model
    import torch

_ANY_OBJECT = {"type": "object"}


def _grammar_args(response_format: ResponseFormat) -> tuple[str, bool]:
    """The schema text and xgrammar's strict mode: strict (no unlisted properties) for a given
    schema, open for "any JSON object", which strict mode would reduce to `{}`."""
    if response_format.kind == "json":
        return json.dumps(_ANY_OBJECT), False
    return json.dumps(response_format.schema), True  # key order kept: properties come out in schema order


def validate(response_format: ResponseFormat) -> None:
    """Raise InvalidRequest when xgrammar cannot turn the schema into a grammar (needs no model;
    blocking the first time, when it imports xgrammar)."""
    import xgrammar

    schema, strict = _grammar_args(response_format)
    try:
        xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequest(f"unsupported JSON schema: {str(exc).strip()}", param="response_format") from exc


class GrammarCache:
    """One model's grammar compiler. xgrammar's compiler caches compiled grammars by schema, so a
    schema used again costs nothing; it is built on first use, from the model's tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the logits row's width, which may exceed the tokenizer's
        self._stop_token_ids = stop_token_ids
        self._compiler: Any = None
        self._lock = threading.Lock()

    def matcher(self, response_format: ResponseFormat) -> TokenConstraint:
        """A fresh matcher for one request (blocking: compiles the grammar unless cached)."""
        import xgrammar

        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                )
                self._compiler = xgrammar.GrammarCompiler(info)
        try:
            if response_format.kind == "structural_tag":  # forced tool calls, built by vLLM's tool parsers
                compiled = self._compiler.compile_structural_tag(response_format.structural_tag)
            else:
                schema, strict = _grammar_args(response_format)
                compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=strict)
        except (RuntimeError, ValueError) as exc:
            param = "tools" if response_format.kind == "structural_tag" else "response_format"
            raise InvalidRequest(f"unsupported JSON schema: {str(exc).strip()}", param=param) from exc
        return TokenConstraint(xgrammar.GrammarMatcher(compiled), self._vocab_size)


class TokenConstraint:
    """One request's grammar state: masks each logits row, then follows the chosen token."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import xgrammar

        self._matcher = matcher
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._apply_bitmask = xgrammar.apply_token_bitmask_inplace

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of one logits row with every token the grammar forbids at -inf."""
        row = logits.float().clone()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if not self._bitmask.any():  # e.g. a string `pattern` nothing matches: the schema is the problem
            raise InvalidRequest(
                "the JSON schema cannot be satisfied: no token can continue the output here", param="response_format"
            )
        self._apply_bitmask(row, self._bitmask.to(row.device))
        return row

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} violates the output grammar")

    @property
    def finished(self) -> bool:
        """The output is complete (the grammar accepted a stop token or has nothing left to match)."""
        return self._matcher.is_terminated()
