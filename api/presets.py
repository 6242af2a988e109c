"""Presets in Ollama's terms: built from a `POST /api/create` body, shown as `/api/show` and
`/api/tags` show them (the parameters and Modelfile text formatted as Ollama formats them).

Ollama's create (server/create.go) copies the `from` model's layers and replaces those the request
sets: the template, system prompt and messages are replaced when given, parameters are merged (the
request's win). A preset made from another preset is flattened the same way, so every preset names
the pulled model it runs on, and later changes to the other preset do not reach it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from api.ollama_schemas import CreateRequest, Options
from errors import InvalidRequest, ModelNotFound
from jobs.presets import Preset
from runners.adapters import find_adapter
from runners.local_cache import find_local
from runners.names import ModelRef, parse_model_name
from runners.presets import check_chat_template
from runners.quantization import bitsandbytes_available
from runtime import Runtime


async def build_preset(runtime: Runtime, body: CreateRequest) -> Preset:
    """The preset `body` describes, checked (400/404 before anything is stored), not yet stored."""
    name = parse_model_name(body.model)
    if body.modelfile is not None:
        raise InvalidRequest(
            "`modelfile` is no longer part of Ollama's create API: send `from`, `system`, `parameters`, "
            "`template`, `messages` as fields (ollama create does this from a Modelfile)",
            param="modelfile",
        )
    if body.files:
        raise InvalidRequest(
            "creating a model from uploaded files is not supported here: pull it from the Hugging Face Hub "
            "(POST /api/pull), then create from it with `from`",
            param="files",
        )
    if not body.from_:
        raise InvalidRequest("neither 'from' or 'files' was specified", param="from")  # Ollama's words
    source = parse_model_name(body.from_)
    if await asyncio.to_thread(find_local, name) is not None:
        raise InvalidRequest(
            f"'{name.name}' is a pulled model: give the new model another name (or delete the pulled one first)",
            param="model",
        )
    parent = await asyncio.to_thread(runtime.presets.get, source.name)
    if parent is None and await asyncio.to_thread(find_local, source) is None:
        raise ModelNotFound(f"model '{body.from_}' not found, try pulling it first", param="from")
    adapters = [parse_model_name(a).name for a in body.adapter_names()]
    if len(adapters) > 1:
        raise InvalidRequest("only one adapter is currently supported", param="adapters")  # Ollama's words
    # An adapter is a model name served over its base (runners.presets.preset_model): it must be
    # pulled, and made for this preset's base.
    base = parent.base if parent else source.name
    for adapter_name in adapters:
        await _check_adapter(adapter_name, base)
    if body.template:
        check_chat_template(body.template)
    quantize = body.quantize_request()
    if quantize == "q4" and not bitsandbytes_available():
        raise InvalidRequest("quantize to 4-bit needs bitsandbytes, which is not installed here", param="quantize")
    messages = [_stored_message(m.model_dump(exclude_none=True)) for m in body.messages or []]
    parameters = {**(parent.parameters if parent else {}), **(body.parameters or {})}
    options = Options.model_validate(parameters)
    return Preset(
        name=name.name,
        base=parent.base if parent else source.name,
        system=body.system or (parent.system if parent else None),
        template=body.template or (parent.template if parent else None),
        parameters=parameters,
        options=options.given(),
        num_ctx=options.num_ctx,
        messages=messages or (parent.messages if parent else []),
        adapters=adapters or (parent.adapters if parent else []),
        quantize=quantize or (parent.quantize if parent else None),
        license=_licenses(body.license) or (parent.license if parent else []),
    )


async def _check_adapter(name: str, base: str) -> None:
    """A preset's adapter: a pulled LoRA adapter of the preset's base model."""
    adapter = await asyncio.to_thread(find_adapter, parse_model_name(name))
    if adapter is None:
        found = await asyncio.to_thread(find_local, parse_model_name(name))
        if found is None:
            raise ModelNotFound(f"adapter '{name}' is not pulled; pull it first", param="adapters")
        raise InvalidRequest(f"'{name}' is not a LoRA adapter (no adapter_config.json)", param="adapters")
    if adapter.base.repo_id != parse_model_name(base).repo_id:
        raise InvalidRequest(
            f"adapter '{name}' was made for '{adapter.base.name}', not for this model's base '{base}'",
            param="adapters",
        )


def _stored_message(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("images"):
        raise InvalidRequest("a preset's messages cannot carry images", param="messages")
    return {"role": message["role"], "content": message.get("content") or ""}


def _licenses(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) and value else list(value or [])


def creation_statuses(preset: Preset) -> list[dict[str, str]]:
    """The status lines of an Ollama create, one per part the preset has."""
    parts = [
        ("template", preset.template),
        ("system", preset.system),
        ("adapter", preset.adapters),
        ("parameters", preset.parameters),
        ("messages", preset.messages),
    ]
    return [
        {"status": "reading model metadata"},
        *({"status": f"creating {part} layer"} for part, value in parts if value),
        {"status": "writing manifest"},
        {"status": "success"},
    ]


def digest(preset: Preset) -> str:
    """A content digest (Ollama lists one per model): changes whenever the preset does."""
    content = preset.model_dump(exclude={"created_at", "modified_at"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def tagged(name: str) -> str:
    return parse_model_name(name).tagged_name


def parameters_text(parameters: dict[str, Any]) -> str:
    """`/api/show`'s `parameters`: one `name value` line per value, as Ollama prints them
    (`%-30s %#v`: strings quoted, a list one line per item)."""
    return "\n".join(
        f"{key:<30} {_go_value(item)}"
        for key, value in parameters.items()
        for item in (value if isinstance(value, list) else [value])
    )


def modelfile_text(preset: Preset) -> str:
    """`/api/show`'s `modelfile`, as `ollama show --modelfile` prints a created model."""
    lines = [f"FROM {tagged(preset.base)}"]
    lines += [f"ADAPTER {_quote(adapter)}" for adapter in preset.adapters]
    if preset.template:
        lines.append(f"TEMPLATE {_quote(preset.template)}")
    if preset.system:
        lines.append(f"SYSTEM {_quote(preset.system)}")
    for key, value in preset.parameters.items():
        lines += [f"PARAMETER {key} {_quote(_go_text(v))}" for v in (value if isinstance(value, list) else [value])]
    lines += [f"LICENSE {_quote(text)}" for text in preset.license]
    lines += [f"MESSAGE {m['role']} {_quote(m['content'])}" for m in preset.messages]
    header = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {tagged(preset.name)}\n\n"
    )
    return header + "".join(line + "\n" for line in lines)


def show_fields(preset: Preset) -> dict[str, Any]:
    """What a preset changes in its base model's `/api/show` answer."""
    fields: dict[str, Any] = {
        "modelfile": modelfile_text(preset),
        "parameters": parameters_text(preset.parameters),
        "system": preset.system or "",
        "license": "\n".join(preset.license),
    }
    if preset.template:
        fields["template"] = preset.template
    if preset.messages:
        fields["messages"] = preset.messages
    return fields


def _go_value(value: Any) -> str:
    """Go's `%#v` of a JSON value: strings quoted, whole numbers without a fraction."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return _go_text(value)


def _go_text(value: Any) -> str:
    """Go's `%v` of a JSON value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(text: str) -> str:
    """The Modelfile parser's quoting (parser/parser.go `quote`)."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def renamed(preset: Preset, name: ModelRef) -> Preset:
    """A copy of `preset` under another name (Ollama's copy of a created model)."""
    data = preset.model_dump(exclude={"name", "created_at", "modified_at"})
    return Preset(name=name.name, **data)
