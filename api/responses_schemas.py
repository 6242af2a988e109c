"""OpenAI Responses API request bodies and their mapping onto the server's chat messages.

Input items honoured: messages (`input_text` / `output_text` parts), `function_call`,
`function_call_output` and `reasoning`; tools: `function`. Built-in tools (web search, file search,
computer use, ...) and non-text inputs (images, files) are refused with a 400 naming them; fields
that only steer OpenAI's platform (`user`, `metadata`, `service_tier`, `include`, ...) are accepted.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from errors import InvalidRequest


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tools of type {value.get('type')!r} are not supported by this server: only 'function'")
        return value


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type 'json_schema' needs `schema`")
        return self


class TextConfig(BaseModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(BaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(BaseModel):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True  # OpenAI's default
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    background: bool | None = None
    # vLLM's extensions, as on chat completions
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        if self.background:
            raise ValueError("background responses are not supported by this server")
        if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in self.tool_names():
            raise ValueError(f"tool_choice names {self.tool_choice.name!r}, which is not one of `tools`")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs `tools`")
        return self

    def tool_names(self) -> set[str]:
        return {t.name for t in self.tools or []}

    def tool_list(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in self.tools]

    def tool_choice_value(self) -> str | dict[str, Any]:
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice

    def tool_choice_echo(self) -> Any:
        """tool_choice as the response object shows it."""
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice or "auto"

    def template_kwargs(self) -> dict[str, Any]:
        """As on chat completions (vLLM's rule): `reasoning.effort` reaches the template and turns
        thinking on or off for templates with an `enable_thinking` switch."""
        effort = self.reasoning.effort if self.reasoning else None
        return {} if effort is None else {"reasoning_effort": effort, "enable_thinking": effort != "none"}

    def input_messages(self) -> list[dict[str, Any]]:
        """This request's input as chat messages (without `instructions`, which never carry over)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return input_items_to_messages(self.input)


_ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as the items GET /v1/responses/{id}/input_items lists: typed, with ids, text as parts."""
    raw = [{"role": "user", "content": value}] if isinstance(value, str) else value
    items = []
    for given in raw:
        item: dict[str, Any] = {"type": "message", **given} if "type" not in given else dict(given)
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{_ITEM_ID_PREFIXES.get(item['type'], 'item')}_{uuid.uuid4().hex}")
        items.append(item)
    return items


def input_items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat-template messages: consecutive `function_call` items join the
    assistant turn before them (as `tool_calls` with arguments objects), `function_call_output`
    becomes a `tool` message, a `reasoning` item the next assistant turn's `reasoning_content`."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call_id -> function name, for templates that name tool results
    reasoning: list[str] = []

    def assistant_turn() -> dict[str, Any]:
        last = out[-1] if out else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            out.append(last)
        if reasoning:
            last["reasoning_content"] = "\n".join(reasoning)
            reasoning.clear()
        return last

    for index, item in enumerate(items):
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role", ""), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise InvalidRequest(f"input[{index}]: unknown role {item.get('role')!r}", param=f"input[{index}]")
            text = _text(item.get("content"), index)
            if role == "assistant":
                turn = assistant_turn()
                if turn.get("tool_calls"):  # text after calls: a turn of its own
                    out.append(turn := {"role": "assistant", "content": ""})
                turn["content"] += text
            else:
                out.append({"role": role, "content": text})
        elif kind == "function_call":
            call_id, name = _required(item, "call_id", index), _required(item, "name", index)
            names[call_id] = name
            function = {"name": name, "arguments": _arguments(item.get("arguments"))}
            call = {"id": call_id, "type": "function", "function": function}
            assistant_turn().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id = _required(item, "call_id", index)
            output = item.get("output", "")
            content = output if isinstance(output, str) else _text(output, index)
            message = {"role": "tool", "tool_call_id": call_id, "content": content}
            if call_id in names:
                message["name"] = names[call_id]
            out.append(message)
        elif kind == "reasoning":
            reasoning += [part.get("text", "") for part in item.get("content") or item.get("summary") or []]
        else:
            raise InvalidRequest(
                f"input[{index}]: items of type {kind!r} are not supported by this server", param=f"input[{index}]"
            )
    return out


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content or []:
        if part.get("type") not in ("input_text", "output_text", "text", "refusal"):
            raise InvalidRequest(
                f"input[{index}]: content parts of type {part.get('type')!r} are not supported; only text",
                param=f"input[{index}]",
            )
        texts.append(part.get("text") or part.get("refusal") or "")
    return "".join(texts)


def _required(item: dict[str, Any], field: str, index: int) -> str:
    value = item.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(
            f"input[{index}]: {item.get('type')} items need `{field}`", param=f"input[{index}].{field}"
        )
    return value


def _arguments(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text
