"""The OpenAI responses this server sends, as pydantic models for /openapi.json (and /docs).

api/openai.py builds its answers as dicts, so the bytes a client reads are exactly what it builds;
these models only describe them (named as OpenAI's own types are, in its API reference and SDK). A
field marked optional may be absent: e.g. `reasoning_content` only when the model reasoned,
`usage` on a chunk only with `stream_options.include_usage`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.openapi_docs import ResponseModel

FinishReason = Literal["stop", "length", "tool_calls"]


class CompletionUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# -- chat completions ----------------------------------------------------------------------------


class TopLogprob(ResponseModel):
    token: str
    logprob: float = Field(description="clamped at -9999 (JSON has no -infinity), as vLLM does")
    bytes: list[int]


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[ChatCompletionTokenLogprob]
    refusal: None = None


class ChatCompletionToolCallFunction(ResponseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class ChatCompletionMessageToolCall(ResponseModel):
    id: str
    type: Literal["function"]
    function: ChatCompletionToolCallFunction


class ChatCompletionMessage(ResponseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    reasoning_content: str | None = Field(None, description="the model's reasoning, when it reasoned (vLLM's name)")
    reasoning: str | None = Field(None, description="the same reasoning under vLLM's newer name")
    tool_calls: list[ChatCompletionMessageToolCall] | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChoiceDeltaToolCallFunction(ResponseModel):
    name: str | None = None
    arguments: str | None = Field(None, description="the next piece of the arguments' JSON text")


class ChoiceDeltaToolCall(ResponseModel):
    index: int
    id: str | None = Field(None, description="in the call's first piece, with `type`")
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction


class ChoiceDelta(ResponseModel):
    role: Literal["assistant"] | None = Field(None, description="in each choice's first chunk")
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChatCompletionChunkChoice(ResponseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(ResponseModel):
    """One server-sent event (`data: {...}`) of a streamed chat completion; the stream ends with
    `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice] = Field(description="empty in the final usage chunk")
    usage: CompletionUsage | None = Field(None, description="with stream_options.include_usage: null until the last")


# -- text completions ----------------------------------------------------------------------------


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None = Field(description="null in a stream chunk before the choice's last")


class Completion(ResponseModel):
    """A text completion; streamed, each server-sent event is one of these with the next piece of
    text (`usage` only with stream_options.include_usage), and the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


# -- embeddings and models -----------------------------------------------------------------------


class Embedding(ResponseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="a base64 text of little-endian float32s with encoding_format")


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(ResponseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(ResponseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when the model was pulled (Unix seconds)")
    owned_by: str


class ModelList(ResponseModel):
    object: Literal["list"]
    data: list[Model]


# -- errors --------------------------------------------------------------------------------------


class OpenAIError(ResponseModel):
    message: str
    type: str = Field(description="e.g. invalid_request_error, not_found_error, server_error")
    param: str | None = Field(description="the request field at fault, when one is")
    code: None = None


class OpenAIErrorResponse(ResponseModel):
    """Every /v1 failure (and a stream's in-band error event) carries this body."""

    error: OpenAIError
