"""Ollama's request bodies (github.com/ollama/ollama docs/api.md) and their mapping to ours.

Unknown `options` (mirostat, num_gpu, ...) are ignored as Ollama ignores options a
runner does not use; supported ones are validated and an invalid value is a 400 naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.tool_schemas import ToolChoiceParam, ToolParam, tool_choice_value, tool_dicts
from errors import InvalidRequest
from runners.base import ResponseFormat, SamplingOptions, left_out
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
from runners.pool import DEFAULT, KeepAlive
from runners.quantization import QuantizeRequest
from settings import parse_duration

# Ollama's defaults (docs/modelfile.md), used when a request leaves an option out.
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 0.8, 40, 0.9
DEFAULT_REPEAT_PENALTY, DEFAULT_REPEAT_LAST_N = 1.1, 64


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2)  # -1: no limit, -2: fill the context
    num_ctx: int | None = Field(None, ge=1)  # a smaller context than the model's (longer chats are fitted)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    repeat_penalty: float | None = Field(None, ge=REPEAT_PENALTY_MIN, le=REPEAT_PENALTY_MAX)
    repeat_last_n: int | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    frequency_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    ignore_eos: bool = False  # vLLM's extension, not Ollama's: fixed-length outputs for benchmarks

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def given(self) -> dict[str, Any]:
        """The sampling settings these options set, by SamplingOptions' field names (a preset's defaults)."""
        values = {
            "max_tokens": self.num_predict,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "stop": self.stop,
            "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos or None,
        }
        given: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        if "max_tokens" in given and given["max_tokens"] < 0:  # -1: no limit, -2: fill the context
            given["max_tokens"] = None
        return given

    def sampling(self) -> SamplingOptions:
        given = self.given()
        defaults = SamplingOptions(
            max_tokens=None,
            temperature=DEFAULT_TEMPERATURE,
            top_p=DEFAULT_TOP_P,
            top_k=DEFAULT_TOP_K,
            repeat_penalty=DEFAULT_REPEAT_PENALTY,
            repeat_last_n=DEFAULT_REPEAT_LAST_N,
        )
        return dataclasses.replace(defaults, **given, defaulted=left_out(**dict.fromkeys(given, True)))


class _ModelRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    keep_alive: float | str | None = None

    def keep_alive_seconds(self) -> KeepAlive:
        """`5m`, `30s`, seconds; 0 unloads after the request; negative keeps the model loaded."""
        if self.keep_alive is None:
            return DEFAULT
        try:
            return parse_duration(self.keep_alive)
        except ValueError as exc:
            raise InvalidRequest(f"invalid keep_alive: {exc}", param="keep_alive") from None


class _GenerateCommon(_ModelRequest):
    format: str | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True

    def response_format(self) -> ResponseFormat | None:
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return ResponseFormat("json")
        if isinstance(self.format, dict):
            return ResponseFormat("json_schema", self.format)
        raise InvalidRequest(f'invalid format {self.format!r}: use "json" or a JSON schema', param="format")


class ToolCallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(BaseModel):
    id: str | None = None
    function: ToolCallFunction


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # a tool result: the tool it answers
    tool_call_id: str | None = None

    def for_template(self, index: int = 0) -> dict[str, Any]:
        """The message as chat templates take it (the same shape the OpenAI dialect produces).
        With `images`: content parts, the images first (where Ollama puts them), then the text;
        `index` is the message's place in the request, for naming a bad image."""
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.images:
            images = [image_part(data, f"messages[{index}].images[{i}]") for i, data in enumerate(self.images)]
            message["content"] = [*images, {"type": "text", "text": self.content or ""}]
        if self.tool_name:
            message["name"] = self.tool_name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in self.tool_calls
            ]
        if self.thinking:
            message["reasoning_content"] = self.thinking
        return message


Think = bool | Literal["low", "medium", "high"] | None


def thinking_switches(think: Think) -> dict[str, Any]:
    """Ollama's `think` as chat-template switches: on/off (`enable_thinking`, Qwen3 and others),
    and a level (`reasoning_effort`, gpt-oss)."""
    if think is None:
        return {}
    if isinstance(think, str):
        return {"enable_thinking": True, "reasoning_effort": think}
    return {"enable_thinking": think}


class ChatRequest(_GenerateCommon):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolParam] | None = None
    # Not Ollama's: OpenAI's tool_choice (none, auto, required, or {"type": "function", "function":
    # {"name": ...}}), so Ollama clients can force a call too. Ollama's own behaviour is "auto".
    tool_choice: ToolChoiceParam = None
    think: Think = None

    def tool_list(self) -> list[dict[str, Any]] | None:
        return tool_dicts(self.tools)

    def tool_choice_value(self) -> str | dict[str, Any]:
        return tool_choice_value(self.tool_choice, self.tool_list())


class GenerateRequest(_GenerateCommon):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    template: str | None = None  # Go templates cannot apply to Hugging Face models: ignored
    context: list[int] | None = None  # deprecated in Ollama: ignored
    think: Think = None


class EmbedRequest(_ModelRequest):
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: Options = Field(default_factory=Options)


class LegacyEmbeddingsRequest(_ModelRequest):
    prompt: str = ""
    options: Options = Field(default_factory=Options)


class NamedModel(BaseModel):
    """Bodies that name one model (show, delete, pull); older clients send `name`, not `model`."""

    model: str
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @model_validator(mode="before")
    @classmethod
    def _name_is_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data


class CopyRequest(BaseModel):
    source: str
    destination: str


# Ollama's quantization types (docs/api.md, "Create a Model") as this server's precision policy:
# 4-bit is bitsandbytes nf4, half precision bf16/fp16; 8-bit types have no equivalent here.
_QUANTIZE_TYPES: dict[str, QuantizeRequest] = {
    **dict.fromkeys(("q4_k_m", "q4_k_s", "q4_0", "q4_1", "q4"), "q4"),
    **dict.fromkeys(("f16", "fp16", "bf16"), "fp16"),
    **dict.fromkeys(("f32", "fp32", "no"), "no"),
}


class CreateRequest(BaseModel):
    """`POST /api/create` (Ollama's current API: the Modelfile's parts as fields)."""

    model_config = ConfigDict(allow_inf_nan=False, populate_by_name=True)

    model: str
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | list[str] | None = None  # adapter model names (a dict's keys)
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    stream: bool = True
    quantize: str | None = None
    quantization: str | None = None  # the older spelling, still accepted by Ollama
    modelfile: str | None = None  # removed from Ollama's API: refused with a pointer to the fields

    @model_validator(mode="before")
    @classmethod
    def _name_is_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data

    @field_validator("parameters")
    @classmethod
    def _valid_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The same validation as a request's `options`: a bad value is a 400 naming it."""
        if value is None:
            return None
        from pydantic import ValidationError

        try:
            Options.model_validate(value)
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            ) from None
        return {**value, "stop": [value["stop"]]} if isinstance(value.get("stop"), str) else value

    def adapter_names(self) -> list[str]:
        return list(self.adapters or [])

    def quantize_request(self) -> QuantizeRequest | None:
        """The precision asked for, in this server's terms; None: the base model's own policy."""
        text = (self.quantize or self.quantization or "").strip()
        if not text or text.lower() == "auto":
            return None
        if text.lower() not in _QUANTIZE_TYPES:
            raise InvalidRequest(
                f"unsupported quantization type {text}: use q4_K_M (4-bit, bitsandbytes nf4) or f16 (half precision)",
                param="quantize",
            )
        return _QUANTIZE_TYPES[text.lower()]
