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

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from api.tool_schemas import (
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    ToolChoiceParam,
    ToolParam,
    tool_choice_value,
    tool_dicts,
)
from runners.images import image_part
from runners.limits import (
    PENALTY_MAX,
    PENALTY_MIN,
    REPEAT_PENALTY_MAX,
    REPEAT_PENALTY_MIN,
    SEED_MAX,
    SEED_MIN,
    TOP_K_MAX,
)

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

    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    frequency_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    response_format: ResponseFormatParam | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, le=TOP_K_MAX)  # 0 or -1 disables
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=REPEAT_PENALTY_MIN, le=REPEAT_PENALTY_MAX)
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


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides

    @field_validator("url")
    @classmethod
    def _data_or_http(cls, url: str) -> str:
        if not url.startswith(("data:", "http://", "https://")):
            raise ValueError("an image URL must be a data URL (data:image/png;base64,...) or an http(s) URL")
        return url


class ContentPart(BaseModel):
    """A part of a message's content: `text`, or `image_url` (for vision models)."""

    type: str
    text: str = ""
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _known_type(self) -> ContentPart:
        if self.type not in ("text", "image_url"):
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text' and 'image_url'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' part needs `image_url: {url: ...}`")
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
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool results
    reasoning_content: str | None = None  # an assistant turn's reasoning (vLLM's field)
    reasoning: str | None = None  # the same, under vLLM 0.32's newer name

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content if part.type == "text")

    def for_template(self, index: int = 0) -> dict[str, Any]:
        """The message as chat templates take it: developer → system, the legacy `function` role
        → tool, call arguments as objects (templates serialize them with tojson). With images, the
        content stays a list of parts in order (`index`: the message's place, for naming a bad image)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if isinstance(self.content, list) and any(part.image_url for part in self.content):
            message["content"] = [
                image_part(part.image_url.url, f"messages[{index}].content[{i}]", kind="url")
                if part.image_url
                else {"type": "text", "text": part.text}
                for i, part in enumerate(self.content)
            ]
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                }
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


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam = None
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

    def tool_list(self) -> list[dict[str, Any]] | None:
        """`tools`, or the legacy `functions` as tools."""
        if self.tools:
            return tool_dicts(self.tools)
        return tool_dicts([ToolParam(function=f) for f in self.functions or []])

    def tool_choice_value(self) -> str | dict[str, Any]:
        """tool_choice, or the legacy function_call ({"name": ...} names a function)."""
        choice = self.tool_choice
        if choice is None and self.function_call is not None:
            call = self.function_call
            choice = call if isinstance(call, str) else NamedToolChoice(function=call)
        return tool_choice_value(choice, self.tool_list())

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
