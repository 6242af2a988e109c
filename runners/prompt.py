"""Turning a request into the exact prompt text a model sees."""

from __future__ import annotations

from typing import Any

from runners.base import GenerationRequest


def render_prompt(tokenizer: Any, request: GenerationRequest) -> str:
    """A raw prompt as-is; chat messages through the model's chat template.

    Models without a template (gpt2 and other base models) get a plain transcript ending with an
    open assistant turn, which is what such models continue best.
    """
    if request.prompt is not None:
        return request.prompt
    messages = request.messages or []
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])
