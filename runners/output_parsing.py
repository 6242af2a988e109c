"""Reasoning and tool calls out of generated text, with vLLM's maintained parsers.

Which parser a model needs is read from its chat template (the markup the template teaches the
model: `<tool_call>` is Hermes/Qwen's, `<|python_tag|>` Llama 3.1's, ...), overridable per model
with TOOL_CALL_PARSERS / REASONING_PARSERS. The parsing itself is vLLM's `Parser` (reasoning and
tool calls in one object, streaming and whole), which also builds the output constraint that forces
`tool_choice: required` or a named function. vLLM is imported only when a request needs a parser.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from errors import InvalidRequest
from runners.base import Chunk, GenerationRequest, OutputDelta, ResponseFormat, ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from runners.model_info import ModelInfo
    from settings import Settings

# Template markup → vLLM parser name, most specific first.
TOOL_FORMATS = (
    ("<function=", "qwen3_coder"),  # Qwen3-Coder: XML calls inside <tool_call>
    ("<tool_call>", "hermes"),  # Hermes, Qwen2.5, Qwen3, and the many templates that copied them
    ("<|python_tag|>", "llama3_json"),  # Llama 3.1 / 3.2 / 3.3
    ("[TOOL_CALLS]", "mistral"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|tool_calls_section_begin|>", "kimi_k2"),
    ("<|tool_call|>", "granite"),
    ("functools[", "phi4_mini_json"),
)
REASONING_FORMATS = (("<think>", "qwen3"),)  # Qwen3, DeepSeek-R1 distills, QwQ, ... (open or closed in the prompt)
NONE = "none"  # an override that turns a parser off


@dataclass(frozen=True)
class ParserChoice:
    """The parsers a model's output needs (vLLM's names), and why."""

    tool_parser: str | None
    reasoning_parser: str | None
    reason: str

    @property
    def usable(self) -> bool:
        return importlib.util.find_spec("vllm") is not None

    @property
    def tools(self) -> bool:
        return self.tool_parser is not None and self.usable

    @property
    def thinking(self) -> bool:
        return self.reasoning_parser is not None and self.usable


def choose_parsers(repo_id: str, info: ModelInfo, settings: Settings) -> ParserChoice:
    """Pick the parsers from the chat template (and the operator's per-model overrides)."""
    template = info.chat_template or ""
    tool = next((name for marker, name in TOOL_FORMATS if marker in template and "tools" in template), None)
    reasoning = next((name for marker, name in REASONING_FORMATS if marker in template), None)
    why = [
        f"tool calls: {tool} (from the chat template)"
        if tool
        else "tool calls: none (the chat template has no tool-call format)",
        f"reasoning: {reasoning} (from the chat template)" if reasoning else "reasoning: none",
    ]
    if repo_id in settings.tool_call_parsers:
        tool = None if settings.tool_call_parsers[repo_id] == NONE else settings.tool_call_parsers[repo_id]
        why[0] = f"tool calls: {tool or 'none'} (TOOL_CALL_PARSERS)"
    if repo_id in settings.reasoning_parsers:
        reasoning = None if settings.reasoning_parsers[repo_id] == NONE else settings.reasoning_parsers[repo_id]
        why[1] = f"reasoning: {reasoning or 'none'} (REASONING_PARSERS)"
    if (tool or reasoning) and importlib.util.find_spec("vllm") is None:
        why.append("vLLM, whose parsers this server uses, is not installed")
    return ParserChoice(tool, reasoning, "; ".join(why))


_classes: dict[tuple[str | None, str | None], Any] = {}
_classes_lock = threading.Lock()


def _parser_class(choice: ParserChoice) -> Any:
    """vLLM's composed Parser class for these parser names (blocking: the first call imports vLLM)."""
    key = (choice.tool_parser, choice.reasoning_parser)
    with _classes_lock:
        if key not in _classes:
            from vllm.parser.parser_manager import ParserManager

            # "parameter": a call the grammar lets through has arguments valid against the tool's
            # schema (vLLM's default only pins the envelope unless a tool says strict: true).
            _classes[key] = ParserManager.get_parser(
                tool_parser_name=choice.tool_parser,
                reasoning_parser_name=choice.reasoning_parser,
                enable_auto_tools=choice.tool_parser is not None,
                tool_strict_level="parameter",
            )
        return _classes[key]


def _named_choice(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    return None


class OutputParser:
    """One request's output parsing. Blocking to construct (call it in a thread).

    With no tools and no reasoning parser it passes text through untouched. `constraint` is the
    output constraint that forces the requested tool choice (None when nothing is forced).
    """

    def __init__(self, model: str, choice: ParserChoice, tokenizer: Any, request: GenerationRequest) -> None:
        self.request = request
        self.named_tool = _named_choice(request.tool_choice)
        wants_tools = bool(request.tools) and request.tool_choice != "none"
        chat = request.messages is not None and bool(getattr(tokenizer, "chat_template", None))
        if wants_tools and not (chat and choice.tools):
            raise InvalidRequest(f'"{model}" does not support tools ({choice.reason})', param="tools")
        if request.require_thinking and not (chat and choice.thinking):
            raise InvalidRequest(f'"{model}" does not support thinking ({choice.reason})', param="think")
        self.constraint: ResponseFormat | None = None
        self.skip_special_tokens = True
        self._parser: Any = None
        self._vllm_request: Any = None
        self._prompt_ids: list[int] | None = None
        # A forced call or an output format holds from the first token (our engines apply the
        # grammar from there), so the model cannot reason first: nothing is read as reasoning.
        forced = wants_tools and (request.tool_choice == "required" or self.named_tool is not None)
        reasoning = None if forced or request.response_format is not None else choice.reasoning_parser
        tools = choice.tool_parser if wants_tools else None
        if chat and (tools or reasoning):
            self._start(ParserChoice(tools, reasoning, choice.reason), tokenizer, request)

    def _start(self, choice: ParserChoice, tokenizer: Any, request: GenerationRequest) -> None:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import StructuredOutputsParams

        # The client's own output format, so that an "auto" tool grammar is combined with it
        # (text in that format, or a call) rather than replacing it.
        response_format = request.response_format if self.named_tool is None else None  # a named call wins
        structured = None
        if response_format is not None and response_format.kind == "json":
            structured = StructuredOutputsParams(json_object=True)
        elif response_format is not None and response_format.kind == "json_schema":
            structured = StructuredOutputsParams(json=response_format.schema)

        try:
            vllm_request = ChatCompletionRequest(
                model="-",
                messages=[{"role": "user", "content": ""}],  # the parsers never read messages
                tools=request.tools if choice.tool_parser else None,
                tool_choice=request.tool_choice if request.tools and choice.tool_parser else None,
                parallel_tool_calls=request.parallel_tool_calls,
                chat_template_kwargs=request.template_kwargs or None,
                structured_outputs=structured,
            )
        except (ValidationError, VLLMValidationError, ValueError) as exc:
            raise InvalidRequest(f"invalid tools or tool_choice: {_first_error(exc)}", param="tool_choice") from exc
        parser_cls = _parser_class(choice)
        parser = parser_cls(tokenizer, tools=vllm_request.tools, chat_template_kwargs=request.template_kwargs)
        vllm_request = parser.adjust_request(vllm_request)
        self._parser, self._vllm_request = parser, vllm_request
        self.skip_special_tokens = vllm_request.skip_special_tokens
        forced = vllm_request.structured_outputs
        if forced is not None and forced.structural_tag:
            self.constraint = ResponseFormat("structural_tag", structural_tag=_compact(forced.structural_tag))
        elif forced is not None and forced.json is not None and forced is not structured:
            schema = forced.json if isinstance(forced.json, dict) else json.loads(forced.json)
            self.constraint = ResponseFormat("json_schema", schema)

    def set_prompt(self, prompt_ids: list[int]) -> None:
        """The rendered prompt's ids: whether it left a reasoning section open decides how the
        first generated tokens are read."""
        self._prompt_ids = prompt_ids

    def feed(self, chunk: Chunk) -> OutputDelta:
        """The parsed piece of one streamed chunk (empty while markup is being held back)."""
        if self._parser is None:
            return OutputDelta(content=chunk.text, chunk=chunk)
        prompt, self._prompt_ids = self._prompt_ids, None  # read on the first delta only
        delta = self._parser.parse_delta(
            chunk.text, list(chunk.token_ids), self._vllm_request, prompt, finished=chunk.finish_reason is not None
        )
        if delta is None:
            return OutputDelta(chunk=chunk)
        calls = [self._call_delta(tc) for tc in delta.tool_calls or []]
        return OutputDelta(delta.content or "", delta.reasoning or "", calls, chunk)

    def _call_delta(self, tool_call: Any) -> ToolCallDelta:
        function = tool_call.function
        call_id = tool_call.id
        if call_id is None and function is not None and function.name:
            call_id = _call_id()  # the first piece of a call carries its id
        return ToolCallDelta(
            tool_call.index,
            call_id,
            function.name if function else None,
            (function.arguments if function else None) or "",
        )


def merge_tool_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from their streamed pieces, in index order."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ToolCall(delta.id or _call_id(), delta.name or "", ""))
        call.name = call.name or delta.name or ""
        call.arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


def finish_reason(reason: str, tool_calls: bool, named_tool: str | None) -> str:
    """OpenAI's finish_reason: `length` when the budget ran out, `tool_calls` when calls were made
    (a named choice finishes `stop`, as vLLM does), else `stop`."""
    if reason == "length":
        return "length"  # a call cut short is no call to run
    return "tool_calls" if tool_calls and named_tool is None else "stop"


def _compact(structural_tag: str) -> str:
    """The tag with at most one blank between JSON tokens (our other JSON output is compact): a weak model
    may otherwise spend its whole budget on spaces between the tokens that matter."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "json_schema" and node.get("max_whitespace_cnt") is None:
                node["max_whitespace_cnt"] = 1  # 0 is refused by xgrammar
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    tag = json.loads(structural_tag)
    visit(tag)
    return json.dumps(tag)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc))
    return str(exc)
