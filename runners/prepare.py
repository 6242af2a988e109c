"""Prompt preparation, once for every engine: render, tokenize, fit the context, budget the output
(and the token ids of texts to embed, fitted the same way).

Like TGI's validation step: both engines decode from the `PreparedPrompt` this returns, so the
template's errors, the context check and the token budget are the same whichever engine runs.
Blocking (templates and tokenizers are CPU work): call it in a thread.
"""

from __future__ import annotations

from typing import Any

from errors import InvalidRequest
from runners.base import GenerationRequest, PreparedPrompt
from runners.images import image_parts
from runners.limits import fit_prompt, longest_token_chars
from runners.model_info import FIM_TOKENS


def prepare_prompt(
    tokenizer: Any, request: GenerationRequest, context_length: int, processor: Any = None
) -> PreparedPrompt:
    """The prompt the engine decodes from, with at least one token of room to answer.

    A chat longer than the context is fitted Ollama's way when `request.fit_context` is set (oldest
    turns dropped, system messages and the last message kept), else refused with a 400 as vLLM does.
    Images (decoded already, runners/images.py) go through the model's `processor`, which expands
    each placeholder the template wrote into the image's tokens: they count toward the context.
    """
    if image_parts(request.messages):
        _check_can_see(tokenizer, request, processor)
    context = min(context_length, request.context_limit or context_length)
    text = render_prompt(tokenizer, request)
    ids, model_inputs = _encode(tokenizer, processor, text, request.messages, context)
    too_long = ids is None or len(ids) + 1 > context
    if too_long and request.fit_context and request.messages and _has_template(tokenizer, request):
        text, ids, model_inputs = _fit_messages(tokenizer, processor, request, context)
    if ids is None:
        fit_prompt(tokenizer, text, context)  # raises: longer in characters than the context can hold
        raise AssertionError("unreachable")
    if len(ids) + 1 > context:
        raise InvalidRequest(f"input is {len(ids)} tokens; the model's context is {context} tokens", param="messages")
    room = context - len(ids)
    max_tokens = request.options.max_tokens
    return PreparedPrompt(
        request, text, ids, room if max_tokens is None else min(max_tokens, room), model_inputs=model_inputs
    )


def prepare_embedding(tokenizer: Any, texts: list[str], context_length: int, *, truncate: bool) -> list[list[int]]:
    """Token ids of each text to embed (with the tokenizer's special tokens, as the model was
    trained), cut to the context when `truncate` (Ollama's default), else refused (400) if longer."""
    return [_embedding_ids(tokenizer, text, context_length, truncate) for text in texts]


def _embedding_ids(tokenizer: Any, text: str, context: int, truncate: bool) -> list[int]:
    text = fit_prompt(tokenizer, text, context, truncate=truncate)  # a huge text is never tokenized whole
    ids: list[int] = tokenizer(text, add_special_tokens=True)["input_ids"] or [_start_token(tokenizer)]
    if truncate:
        ids = ids[:context]
    if len(ids) > context:
        raise InvalidRequest(f"input is {len(ids)} tokens; the model's context is {context} tokens")
    return ids


def _start_token(tokenizer: Any) -> int:
    """What an empty text starts from: BOS, else EOS (a token id of 0 is a real token)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return start if start is not None else 0


def _check_can_see(tokenizer: Any, request: GenerationRequest, processor: Any) -> None:
    if processor is None:
        raise InvalidRequest(
            "this model cannot see images (it is a text-only model): send text only, or use a vision model",
            param="messages",
        )
    if not _has_template(tokenizer, request) or request.suffix is not None:
        raise InvalidRequest(
            "images need the model's chat template to place them; this request or model has none", param="messages"
        )


def _encode(
    tokenizer: Any, processor: Any, text: str, messages: list[dict[str, Any]] | None, context: int
) -> tuple[list[int] | None, dict[str, Any]]:
    """Token ids of `text`, and the processor's other model inputs (pixel_values, ...) when
    `messages` carry images: the processor replaces each image placeholder by the image's tokens.
    None for the ids, without tokenizing, when the text alone is too long to fit."""
    images = [part["image"] for part in image_parts(messages)]
    if not images or processor is None:
        return _tokenize_within(tokenizer, text, context), {}
    if len(text) > context * longest_token_chars(tokenizer):
        return None, {}
    try:
        encoded = processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")
    except ValueError as exc:  # e.g. placeholders and images that do not pair up
        raise InvalidRequest(f"the model's processor refused the images: {exc}", param="messages") from exc
    ids: list[int] = encoded["input_ids"][0].tolist()
    return ids, {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}


def render_prompt(tokenizer: Any, request: GenerationRequest, messages: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for `request` (with `messages` instead of the request's own, when given).

    - `suffix`: fill-in-the-middle with the model's own FIM tokens (400 if it has none).
    - `messages` and a chat template: the template, with the tools and template switches
      (enable_thinking, reasoning_effort, ...) and an open assistant turn; a template that raises
      (roles must alternate, no system role, ...) is the client's 400 with the template's message.
    - `prompt`: used as-is (raw completions; Ollama's generate on models without a template).
    - `messages` alone on a model without a template (gpt2 and other base models): a plain
      `Role: text` transcript ending with an open assistant turn, which such models continue best.
    """
    messages = request.messages if messages is None else messages
    if request.suffix is not None:
        return _fill_in_the_middle(tokenizer, request.prompt or "", request.suffix)
    if messages is not None and _has_template(tokenizer, request):
        return _apply_template(tokenizer, messages, request)
    if request.prompt is not None:
        return request.prompt
    lines = [f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages or []]
    return "\n".join([*lines, "Assistant:"])


def _has_template(tokenizer: Any, request: GenerationRequest) -> bool:
    return bool(request.chat_template or getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], request: GenerationRequest) -> str:
    from jinja2 import TemplateError

    kwargs = dict(request.template_kwargs)
    if request.chat_template:
        kwargs["chat_template"] = request.chat_template
    if request.tools and request.tool_choice != "none":
        kwargs["tools"] = request.tools
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except TemplateError as exc:
        raise InvalidRequest(f"the model's chat template refused the conversation: {exc}", param="messages") from exc


def _tokenize_within(tokenizer: Any, text: str, context: int) -> list[int] | None:
    """Token ids of the rendered prompt (its special tokens are already in the text), or None
    without tokenizing when the text has more characters than `context` tokens can hold (a huge
    prompt would cost memory and minutes to tokenize). An empty prompt still needs a token to
    start from: BOS, else EOS (a token id of 0 is a real token)."""
    if len(text) > context * longest_token_chars(tokenizer):
        return None
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids or [_start_token(tokenizer)]


def _fit_messages(
    tokenizer: Any, processor: Any, request: GenerationRequest, context: int
) -> tuple[str, list[int] | None, dict[str, Any]]:
    """Ollama's rule (server/prompt.go): drop the oldest non-system messages until the prompt fits
    with room to answer; system messages and the last message always stay. Returns the prompt that
    keeps the most history; if even the last message alone does not fit, that (too long) prompt."""
    messages = request.messages or []
    room = max(1, min(request.options.max_tokens or context // 4, context // 4))
    systems = [i for i, m in enumerate(messages) if m.get("role") == "system"]
    movable = [i for i in range(len(messages) - 1) if i not in systems]

    def attempt(dropped: int) -> tuple[str, list[int] | None, dict[str, Any]]:
        gone = set(movable[:dropped])
        kept = [m for i, m in enumerate(messages) if i not in gone]
        text = render_prompt(tokenizer, request, kept)
        return text, *_encode(tokenizer, processor, text, kept, context)

    def fits(prompt: tuple[str, list[int] | None, dict[str, Any]]) -> bool:
        return prompt[1] is not None and len(prompt[1]) + room <= context

    # The fewest dropped messages that fit (the prompt shrinks as more go): a binary search.
    low, high = 1, len(movable)
    best = attempt(high)
    if not fits(best):
        return best
    while low < high:
        middle = (low + high) // 2
        candidate = attempt(middle)
        if fits(candidate):
            best, high = candidate, middle
        else:
            low = middle + 1
    return best


def _fill_in_the_middle(tokenizer: Any, prefix: str, suffix: str) -> str:
    vocab = tokenizer.get_vocab()
    for pre, suf, mid in FIM_TOKENS:
        if pre in vocab and suf in vocab and mid in vocab:
            return f"{pre}{prefix}{suf}{suffix}{mid}"
    raise InvalidRequest(
        "this model does not support insert (no fill-in-the-middle tokens): remove `suffix`", param="suffix"
    )
