"""Turning a request into the exact prompt text a model sees."""

from __future__ import annotations

from typing import Any

from errors import InvalidRequest
from runners.base import GenerationRequest
from runners.model_info import FIM_TOKENS


def render_prompt(tokenizer: Any, request: GenerationRequest) -> str:
    """The prompt text for `request`, the same for every engine.

    - `suffix`: fill-in-the-middle with the model's own FIM tokens (400 if it has none).
    - `messages` and a chat template: the template, with an open assistant turn.
    - `prompt`: used as-is (raw completions; Ollama's generate on models without a template).
    - `messages` alone on a model without a template (gpt2 and other base models): a plain
      `Role: text` transcript ending with an open assistant turn, which such models continue best.
    """
    if request.suffix is not None:
        return _fill_in_the_middle(tokenizer, request.prompt or "", request.suffix)
    if request.messages is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    if request.prompt is not None:
        return request.prompt
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in request.messages or []]
    return "\n".join([*lines, "Assistant:"])


def _fill_in_the_middle(tokenizer: Any, prefix: str, suffix: str) -> str:
    vocab = tokenizer.get_vocab()
    for pre, suf, mid in FIM_TOKENS:
        if pre in vocab and suf in vocab and mid in vocab:
            return f"{pre}{prefix}{suf}{suffix}{mid}"
    raise InvalidRequest("this model does not support insert (no fill-in-the-middle tokens): remove `suffix`",
                         param="suffix")
