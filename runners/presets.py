"""What a preset name means for a request: which model serves it, and what the preset adds.

`resolve` is the one place a requested name becomes the model the pool loads (every dialect's
generation, embeddings, load/unload and PRELOAD_MODELS go through it); `apply_preset` adds a
preset's system prompt, starting conversation, default options and chat template to a request,
the way Ollama applies a created model's layers (server/routes.go): the request's own system
message wins, the preset's messages come before the request's, and options the request sets win.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from errors import InvalidRequest
from runners.base import GenerationRequest
from runners.names import parse_model_name
from runners.quantization import QuantizeRequest

if TYPE_CHECKING:
    from jobs.presets import Preset


class PresetLookup(Protocol):
    def get(self, name: str) -> Preset | None: ...


@dataclass(frozen=True)
class ServedModel:
    """How the pool serves a requested name."""

    name: str  # the pool's name for the loaded model
    files: str | None = None  # the pulled model whose files load under `name`, when `name` is a preset's own
    quantize: QuantizeRequest = "auto"
    preset: Preset | None = None


def preset_model(preset: Preset) -> str:
    """The model a preset's requests run on: its adapter when it has one (an adapter's repo id is a
    model name, served over its base), else its base. The one place adapters map to models."""
    return preset.adapters[0] if preset.adapters else preset.base


async def resolve(presets: PresetLookup | None, name: str) -> ServedModel:
    """The model serving `name` (400 for a malformed name, before any lookup). A preset without a
    precision of its own shares its model's loaded weights; one with `quantize` is loaded on its own,
    under its own name, from its model's files."""
    ref = parse_model_name(name)
    preset = await asyncio.to_thread(presets.get, ref.name) if presets is not None else None
    if preset is None:
        return ServedModel(ref.name)
    model = preset_model(preset)
    if preset.quantize is None:
        return ServedModel(model, preset=preset)
    return ServedModel(ref.name, files=model, quantize=cast(QuantizeRequest, preset.quantize), preset=preset)


def apply_preset(preset: Preset, request: GenerationRequest) -> GenerationRequest:
    """`request` with the preset's settings added (a new request; the original is left as it was).

    Raw prompts (completions, Ollama's `raw`, fill-in-the-middle) get only the options, as in Ollama.
    """
    options = dataclasses.replace(
        request.options,
        **{k: v for k, v in preset.options.items() if k in request.options.defaulted},
        defaulted=request.options.defaulted - preset.options.keys(),
    )
    changes: dict[str, Any] = {
        "options": options,
        "context_limit": request.context_limit or preset.num_ctx,
        "chat_template": request.chat_template or preset.template,
    }
    if request.messages is not None and request.suffix is None:
        messages = request.messages
        own_system = messages[:1] if messages and messages[0].get("role") == "system" else []
        system = own_system or ([{"role": "system", "content": preset.system}] if preset.system else [])
        changes["messages"] = [*system, *preset.messages, *messages[len(own_system) :]]
        if request.prompt is not None and preset.system and not own_system:
            # The text a model without a chat template gets (Ollama's generate: system, blank line, prompt).
            changes["prompt"] = f"{preset.system}\n\n{request.prompt}"
    return dataclasses.replace(request, **changes)


# Actions and fields of a Go template (Ollama's TEMPLATE): `{{ .Prompt }}`, `{{ if .System }}`, `{{ end }}`.
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:\.|\$|(?:if|range|with|else|end|template|block|define)\b)")


def check_chat_template(template: str) -> None:
    """A preset's template must be a Jinja chat template (what Hugging Face tokenizers carry, and
    what `apply_chat_template` renders); an Ollama Go template cannot run here and is refused (400).
    Go actions are looked for first: Jinja parses some of them (`{{ end }}` prints a variable)."""
    from jinja2 import TemplateSyntaxError

    if _GO_TEMPLATE.search(template):
        raise InvalidRequest(
            "template: this is an Ollama (Go) template, which cannot render prompts for Hugging Face models; "
            "give a Jinja chat template (a tokenizer_config.json `chat_template`, over `messages`), "
            "or leave `template` out to use the model's own",
            param="template",
        )
    try:
        _compile(template)
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"template: not a valid Jinja chat template: {exc}", param="template") from None


def _compile(template: str) -> None:
    """Compile as `apply_chat_template` does (transformers' sandbox and its `{% generation %}` tag)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper: plain sandboxed Jinja where it moved
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    else:
        _compile_jinja_template(template)
