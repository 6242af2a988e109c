"""Anthropic Messages API request bodies, their mapping onto the server's chat messages, and
Anthropic's error object.

Kept apart from the serving logic like api/openai_schemas.py. Content blocks the server cannot
honour (images, documents, server tools) are refused with a 400 naming the block type; fields that
only steer Anthropic's own service (`metadata`, `service_tier`, `container`, ...) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from errors import InvalidRequest

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object, by HTTP status (also sent in-band as a stream's `error` event)."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a hint for Anthropic's prompt cache: no effect here


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(BaseModel):
    type: Literal["redacted_thinking"]
    data: str = ""


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


ContentBlock = Annotated[
    TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")
]


class MessageParam(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(BaseModel):
    """A client tool. Anthropic's server tools (web search, code execution, ...) have no
    `input_schema` and are refused: nothing here could run them."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(
                f"tools of type {value['type']!r} (Anthropic's server tools) are not supported by "
                "this server: only client tools with an input_schema"
            )
        return value


class ToolChoiceParam(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_name(self) -> ToolChoiceParam:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs `name`")
        return self


class ThinkingParam(BaseModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)
    display: str | None = None


class OutputFormatParam(BaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigParam(BaseModel):
    """Structured output (`format`) and `effort`, which reaches templates as `reasoning_effort`."""

    effort: str | None = None
    format: OutputFormatParam | None = None


class CountTokensRequest(BaseModel):
    """What a prompt is made of: `/v1/messages/count_tokens` takes exactly this."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfigParam | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> CountTokensRequest:
        choice, names = self.tool_choice, {t.name for t in self.tools or []}
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not one of `tools`")
        if choice is not None and choice.type == "any" and not names:
            raise ValueError("tool_choice 'any' needs `tools`")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat templates take it (see GenerationRequest.messages): tool_use
        blocks become the assistant's `tool_calls`, tool_result blocks `tool` messages."""
        out: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        for message in self.messages:
            out += _user_turn(message) if message.role == "user" else [_assistant_turn(message)]
        return out

    def tool_list(self) -> list[dict[str, Any]] | None:
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return None
        return [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in self.tools
        ]

    def tool_choice_value(self) -> str | dict[str, Any]:
        """auto / any / tool / none as the server's auto / required / named / none."""
        if not self.tools:
            return "none"
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        choice = self.tool_choice.type if self.tool_choice else "auto"
        return {"any": "required"}.get(choice, choice)

    def parallel_tool_calls(self) -> bool | None:
        if self.tool_choice is None or self.tool_choice.disable_parallel_tool_use is None:
            return None
        return not self.tool_choice.disable_parallel_tool_use

    def template_kwargs(self) -> dict[str, Any]:
        """Thinking is off unless asked for (Anthropic's default), through the template switch
        Qwen3-style templates read; templates without the switch ignore it."""
        thinking = self.thinking is not None and self.thinking.type != "disabled"
        effort = self.output_config.effort if self.output_config else None
        return {"enable_thinking": thinking} | ({"reasoning_effort": effort} if effort else {})


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


def _user_turn(message: MessageParam) -> list[dict[str, Any]]:
    """Tool results (which come first in a user turn) as `tool` messages, then the text, if any."""
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            text = block.text()
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block.tool_use_id,
                    "content": f"Error: {text}" if block.is_error else text,
                }
            )
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            raise InvalidRequest(f"a user message cannot hold a {block.type} block", param="messages")
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant_turn(message: MessageParam) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts, thoughts, calls = [], [], []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            function = {"name": block.name, "arguments": block.input}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ToolResultBlock):
            raise InvalidRequest("tool_result blocks belong in a user message", param="messages")
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        turn["tool_calls"] = calls
    if thoughts:
        turn["reasoning_content"] = "\n".join(thoughts)
    return turn
