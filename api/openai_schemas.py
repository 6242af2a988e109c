"""OpenAI API request bodies (the fields of OpenAI's API reference that this server honours).

Kept apart from the serving logic, like vLLM's protocol.py. Fields OpenAI defines that cannot be
honoured here (logit_bias, audio, echo, ...) are refused with a 400 naming the field rather
than silently ignored; harmless bookkeeping fields (user, metadata, store, ...) are accepted.
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `chat_template_kwargs` and `include_reasoning`
are vLLM's extensions, accepted the same way.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

MAX_LOGPROBS = 20  # vLLM's default limit


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent: any JSON object
    strict: bool | None = None


class ResponseFormatParam(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatParam:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is 'json_schema'")
        return self


class GenerationParams(BaseModel):
    """What chat and text completions share: the model, sampling, streaming, output format."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormatParam | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # 0 or -1 disables
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False

    @field_validator("logit_bias", "audio", "echo", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        """Fields of OpenAI's API this server cannot honour: refused when they ask for something."""
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text'")
        return self


class FunctionCallParam(BaseModel):
    name: str
    arguments: str = "{}"  # JSON text


class ToolCallParam(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool results
    reasoning_content: str | None = None  # an assistant turn's reasoning (vLLM's field)
    reasoning: str | None = None  # the same, under vLLM 0.32's newer name

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: developer → system, the legacy `function` role
        → tool, call arguments as objects (templates serialize them with tojson)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls
            ]
        if self.reasoning_content or self.reasoning:
            message["reasoning_content"] = self.reasoning_content or self.reasoning
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text


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


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The legacy function-calling fields, mapped onto tools and tool_choice.
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        tools, choice = self.tool_list(), self.tool_choice_value()
        if isinstance(choice, dict) and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise ValueError(f"tool_choice names {choice['function']['name']!r}, which is not one of `tools`")
        if choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs `tools`")
        return self

    def tool_list(self) -> list[dict[str, Any]]:
        if self.tools:
            return [t.model_dump(exclude_none=True) for t in self.tools]
        return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.functions or []]

    def tool_choice_value(self) -> str | dict[str, Any]:
        """tool_choice (or the legacy function_call); OpenAI's default: auto with tools, none without."""
        choice = self.tool_choice if self.tool_choice is not None else self.function_call
        if choice is None:
            return "auto" if self.tools or self.functions else "none"
        if isinstance(choice, str):
            return choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        return {"type": "function", "function": {"name": name}}

    def template_kwargs(self) -> dict[str, Any]:
        """vLLM's rule: `reasoning_effort` reaches the template, and turns thinking on or off for
        templates with an `enable_thinking` switch unless chat_template_kwargs says otherwise."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs

    def token_limit(self) -> int | None:
        """max_completion_tokens (OpenAI's newer name) wins; None: until the context is full, like vLLM."""
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationParams):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt is required")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported by this server")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def token_limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's and vLLM's default here

    def logprob_count(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_text(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or not all(texts):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported by this server: vectors have the model's own size")
        return value
