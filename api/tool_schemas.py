"""Function tools and tool_choice as OpenAI defines them, shared by every dialect that takes them
(OpenAI, Ollama, whose tools have the same shape, and native /chat)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from errors import InvalidRequest


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice | None


def tool_dicts(tools: list[ToolParam] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates and parsers take them."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def tool_choice_value(choice: ToolChoiceParam, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """The internal tool_choice: OpenAI's default (auto with tools, none without); a named choice
    must name one of the tools and "required" needs some (400 naming tool_choice otherwise)."""
    if choice is None:
        return "auto" if tools else "none"
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names {choice.function.name!r}, which is not one of `tools`", param="tool_choice"
            )
        return {"type": "function", "function": {"name": choice.function.name}}
    if choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs `tools`", param="tool_choice")
    return choice
