"""Request bodies many tests send."""

from __future__ import annotations


def chat_body(model: str, text: str = "hello", **extra: object) -> dict[str, object]:
    """A one-message chat request, in the shape /api/chat, /chat and /v1/chat/completions share."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
