"""Tool calling and reasoning, end to end: the real server, real clients, both engines.

Random weights never choose to call a tool, so calls are forced with `tool_choice` (required or a
named function), which the server enforces with a grammar: the output must parse and validate
whatever the weights. The `auto` path (the model decides) is tested on fixed model outputs fed to
the same parser in small pieces, as streaming delivers them.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from runners.base import Chunk, GenerationRequest
from runners.model_info import ModelInfo
from runners.output_parsing import OutputParser, choose_parsers, merge_tool_calls
from settings import Settings
from tests.support.bodies import chat_body
from tests.support.fixtures import TINY_LLAMA
from tests.support.tiny_models import HERMES_TEMPLATE, LLAMA31_TEMPLATE, LLAMA31_TOKENS, build_tiny_llama
from tests.support.tool_models import (
    CLOCK,
    QWEN,
    WEATHER,
    WEATHER_SCHEMA,
    assert_valid_call,
    rendered_length,
)

LLAMA31 = "test-org/tiny-llama31-tools"  # Llama 3.1 JSON tool calls


@pytest.fixture(scope="session")
def llama31_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("llama31"),
        chat_template=LLAMA31_TEMPLATE,
        extra_tokens=LLAMA31_TOKENS,
        hidden_size=128,
        seed=2,
    )


@pytest.fixture
def client(serve, install_model, qwen_dir: Path, llama31_dir: Path, tiny_llama_dir: Path):
    install_model(qwen_dir, QWEN)
    install_model(llama31_dir, LLAMA31)
    install_model(tiny_llama_dir, TINY_LLAMA)
    return serve(BACKEND="transformers", MAX_CACHE_MODELS="3")


# -- the OpenAI dialect ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [QWEN, LLAMA31])
def test_required_tool_choice_gives_a_valid_call(client, model: str) -> None:
    body = chat_body(
        model,
        "What's the weather in Paris?",
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=1.0,
        seed=3,
    )
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and choice["message"]["content"] in (None, "")
    for call in calls:
        assert call["type"] == "function" and call["id"]
        assert_valid_call(call["function"]["name"], call["function"]["arguments"])


def test_named_tool_choice_streams_name_first_then_arguments(client) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    stream = sdk.chat.completions.create(
        model=QWEN,
        messages=[{"role": "user", "content": "time?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        stream=True,
        seed=4,
    )
    pieces, finish = [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        pieces += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert pieces, "no tool call was streamed"
    first = pieces[0]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_time"
    assert all(p.index == 0 and p.id is None for p in pieces[1:])
    assert_valid_call("get_time", "".join(p.function.arguments or "" for p in pieces))
    assert finish == "stop"  # a named choice finishes "stop", as vLLM's server does


def test_two_turn_agent_loop_with_the_openai_client(client, qwen_dir: Path) -> None:
    """Call, tool result, answer: the history with the call and its result reaches the prompt."""
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    messages: list[dict] = [{"role": "user", "content": "Weather in Rome?"}]
    first = sdk.chat.completions.create(
        model=QWEN,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        seed=5,
    )
    call = first.choices[0].message.tool_calls[0]
    args = assert_valid_call(call.function.name, call.function.arguments)
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = sdk.chat.completions.create(model=QWEN, messages=messages, tools=[WEATHER], max_tokens=8, seed=6)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    expected = [
        messages[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call.function.name, "arguments": args}}],
        },
        {"role": "tool", "content": '{"temperature": 21}'},
    ]
    assert second.usage.prompt_tokens == rendered_length(qwen_dir, expected, tools=[WEATHER])


def test_tools_on_a_model_without_tool_support_are_refused(client) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(TINY_LLAMA, "hi", tools=[WEATHER]))
    assert r.status_code == 400 and "does not support tools" in r.json()["error"]["message"]
    r = client.post("/api/chat", json=chat_body(TINY_LLAMA, "hi", tools=[WEATHER]))
    assert r.status_code == 400 and r.json()["error"].startswith(f'"{TINY_LLAMA}" does not support tools')
    r = client.post("/api/chat", json=chat_body(TINY_LLAMA, "hi", think=True))
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"]


def test_bad_tool_choices_are_400s_naming_the_field(client) -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    r = client.post("/v1/chat/completions", json=chat_body(QWEN, "hi", tools=[WEATHER], tool_choice=named))
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=chat_body(QWEN, "hi", tool_choice="required"))
    assert r.status_code == 400
    r = client.post("/api/chat", json=chat_body(QWEN, "hi", tools=[WEATHER], tool_choice=named, stream=False))
    assert r.status_code == 400 and "nope" in r.json()["error"]


def test_legacy_functions_map_onto_tools(client) -> None:
    body = chat_body(
        QWEN, "weather", functions=[WEATHER["function"]], function_call={"name": "get_weather"}, max_tokens=80, seed=7
    )
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    assert_valid_call("get_weather", call["function"]["arguments"])


def test_auto_tools_keep_the_clients_response_format(client) -> None:
    """With tools on auto, the answer is either a valid call or text in the requested format."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}
    for seed in (12, 13):
        body = chat_body(QWEN, "weather as JSON", tools=[CLOCK], response_format=fmt, max_tokens=60, seed=seed)
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        for call in message.get("tool_calls") or []:
            assert_valid_call(call["function"]["name"], call["function"]["arguments"])
        if not message.get("tool_calls"):
            jsonschema.validate(json.loads(message["content"]), WEATHER_SCHEMA)


def test_open_webui_default_chat_with_its_tools_works(client) -> None:
    """Open WebUI's native function calling sends its tools with every chat, tool_choice unset."""
    body = {
        "model": QWEN,
        "stream": True,
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"}],
        "tools": [
            WEATHER,
            {
                "type": "function",
                "function": {
                    "name": "search_web",
                    "description": "Search the web",
                    "parameters": {
                        "type": "object",
                        "properties": {"query": {"type": "string"}},
                        "required": ["query"],
                    },
                },
            },
        ],
        "stream_options": {"include_usage": True},
        "max_tokens": 6,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] > 0

    # Through an Ollama connection Open WebUI converts the same chat to Ollama's shape
    # (utils/payload.py convert_payload_openai_to_ollama): tools stay, sampling moves to options.
    ollama_body = {
        "model": QWEN,
        "messages": body["messages"],
        "stream": True,
        "tools": body["tools"],
        "options": {"num_predict": 6},
    }
    with client.stream("POST", "/api/chat", json=ollama_body) as r:
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0


def test_langchain_bind_tools_forced_call(client) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=QWEN, base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_tokens=80, seed=8
    )
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_SCHEMA)


# -- the Ollama dialect and native /chat -----------------------------------------------------------


def test_ollama_forced_call_json_and_stream(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = chat_body(
        QWEN,
        "weather?",
        tools=[WEATHER, CLOCK],
        tool_choice=named,
        stream=False,
        options={"num_predict": 80, "seed": 9},
    )
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    calls = r.json()["message"]["tool_calls"]
    for call in calls:
        assert isinstance(call["function"]["arguments"], dict)  # Ollama sends objects, not JSON text
        assert_valid_call(call["function"]["name"], call["function"]["arguments"])

    with client.stream("POST", "/api/chat", json={**body, "stream": True}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    streamed = [c for line in lines for c in line.get("message", {}).get("tool_calls", [])]
    assert [c["function"]["name"] for c in streamed] == [c["function"]["name"] for c in calls]
    for call in streamed:  # each call whole in one chunk
        assert_valid_call(call["function"]["name"], call["function"]["arguments"])
    assert lines[-1]["done"] is True


def test_ollama_client_with_a_python_function_as_tool(client, qwen_dir: Path) -> None:
    """ollama-python turns a function into a tool schema; the tool result turn reaches the prompt."""
    import ollama

    def get_weather(city: str, metric: bool) -> str:
        """Weather in a city.

        Args:
          city: the city
          metric: use degrees Celsius
        """
        return "sunny"

    sdk = ollama.Client(host=str(client.base_url))
    sdk._client = client  # the official client's calls, sent to the in-process server
    answer = sdk.chat(
        model=QWEN, messages=[{"role": "user", "content": "hi"}], tools=[get_weather], options={"num_predict": 4}
    )
    assert answer.done
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "metric": True}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    second = sdk.chat(model=QWEN, messages=history, tools=[get_weather], options={"num_predict": 4})
    from ollama._utils import convert_function_to_tool

    tools = [convert_function_to_tool(get_weather).model_dump(exclude_none=True)]
    sent = [
        history[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "metric": True}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "name": "get_weather"},
    ]
    assert second.prompt_eval_count == rendered_length(qwen_dir, sent, tools=tools)


def test_show_capabilities_tell_the_truth(client) -> None:
    caps = client.post("/api/show", json={"model": QWEN}).json()["capabilities"]
    assert "tools" in caps and "thinking" in caps
    caps = client.post("/api/show", json={"model": LLAMA31}).json()["capabilities"]
    assert "tools" in caps and "thinking" not in caps
    caps = client.post("/api/show", json={"model": TINY_LLAMA}).json()["capabilities"]
    assert "tools" not in caps and "thinking" not in caps


def test_think_switch_reaches_the_template(client, qwen_dir: Path) -> None:
    messages = [{"role": "user", "content": "think about it"}]
    off = client.post(
        "/api/chat", json=chat_body(QWEN, "think about it", think=False, stream=False, options={"num_predict": 2})
    )
    assert off.status_code == 200, off.text
    assert off.json()["prompt_eval_count"] == rendered_length(qwen_dir, messages, enable_thinking=False)
    on = client.post(
        "/v1/chat/completions",
        json=chat_body(QWEN, "think about it", max_tokens=2, chat_template_kwargs={"enable_thinking": True}),
    )
    assert on.json()["usage"]["prompt_tokens"] == rendered_length(qwen_dir, messages)
    status = client.get("/status").json()
    [loaded] = [m for m in status["loaded_models"] if m["model"] == QWEN]
    assert loaded["tool_call_parser"] == "hermes" and loaded["reasoning_parser"] == "qwen3"


def test_native_chat_forced_call(client) -> None:
    body = chat_body(
        QWEN,
        "weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
    )
    r = client.post("/chat", json=body)
    assert r.status_code == 200, r.text
    [call, *_] = r.json()["message"]["tool_calls"]
    assert_valid_call(call["function"]["name"], call["function"]["arguments"])


# -- parsing the model's own choices (auto), on fixed outputs ---------------------------------------


def _feed(parser: OutputParser, tokenizer, text: str, piece_tokens: int = 2) -> tuple[str, str, list]:
    """Stream `text` through the parser `piece_tokens` tokens at a time, as an engine would."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    content, reasoning, calls = [], [], []
    for start in range(0, len(ids), piece_tokens):
        piece = ids[start : start + piece_tokens]
        done = start + piece_tokens >= len(ids)
        chunk = Chunk(
            tokenizer.decode(ids[: start + piece_tokens])[len(tokenizer.decode(ids[:start])) :],
            token_ids=piece,
            finish_reason="stop" if done else None,
        )
        delta = parser.feed(chunk)
        content.append(delta.content)
        reasoning.append(delta.reasoning)
        calls += delta.tool_calls
    return "".join(content), "".join(reasoning), merge_tool_calls(calls)


def _parser(model_dir: Path, request: GenerationRequest, repo: str) -> tuple[OutputParser, object]:
    from transformers import AutoTokenizer

    from runners.local_cache import LocalModel  # noqa: F401 - describe() reads files only
    from runners.model_info import _describe

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    info: ModelInfo = _describe(model_dir, "test")
    choice = choose_parsers(repo, info, Settings())
    parser = OutputParser(repo, choice, tokenizer, request)
    text = tokenizer.apply_chat_template(
        request.messages, tools=request.tools, tokenize=False, add_generation_prompt=True, **request.template_kwargs
    )
    parser.set_prompt(tokenizer(text, add_special_tokens=False)["input_ids"])
    return parser, tokenizer


@pytest.mark.parametrize("piece_tokens", [1, 3])
def test_auto_hermes_output_with_reasoning_text_and_parallel_calls(qwen_dir: Path, piece_tokens: int) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER, CLOCK])
    parser, tokenizer = _parser(qwen_dir, request, QWEN)
    output = (
        "<think>\nThe user wants two things.\n</think>\n\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Rome", "metric": true}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    content, reasoning, calls = _feed(parser, tokenizer, output, piece_tokens)
    assert reasoning.strip() == "The user wants two things."
    assert content.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome", "metric": True}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2


def test_auto_plain_answer_and_thinking_disabled(qwen_dir: Path) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "x"}], tools=[WEATHER], template_kwargs={"enable_thinking": False}
    )
    parser, tokenizer = _parser(qwen_dir, request, QWEN)
    content, reasoning, calls = _feed(parser, tokenizer, "Just an answer, no tools needed.")
    assert (content, reasoning, calls) == ("Just an answer, no tools needed.", "", [])


def test_auto_llama31_json_call(llama31_dir: Path) -> None:
    request = GenerationRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    parser, tokenizer = _parser(llama31_dir, request, LLAMA31)
    output = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "metric": false}}'
    content, _, calls = _feed(parser, tokenizer, output)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "metric": False})]
    assert content.strip() == ""


def test_parser_overrides_per_model() -> None:
    info = ModelInfo("llama", "LlamaForCausalLM", 1, "float32", None, 512, {}, chat_template=HERMES_TEMPLATE)
    settings = Settings(tool_call_parsers={QWEN: "none"}, reasoning_parsers={QWEN: "deepseek_r1"})
    choice = choose_parsers(QWEN, info, settings)
    assert choice.tool_parser is None and choice.reasoning_parser == "deepseek_r1"
    assert "TOOL_CALL_PARSERS" in choice.reason and "REASONING_PARSERS" in choice.reason


# -- the vLLM engine --------------------------------------------------------------------------------


class TestOnVllm:
    @pytest.fixture(scope="class")
    def url(self, tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path):
        from tests.support.server_process import in_process_env, in_process_server

        env = in_process_env(tmp_path_factory.mktemp("vllm-tools"), {QWEN: qwen_dir}, "vllm")
        with in_process_server(env) as url:
            yield url

    def test_required_and_named_calls_json_and_stream(self, url: str) -> None:
        body = chat_body(
            QWEN,
            "weather?",
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            seed=11,
        )
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
        for call in r.json()["choices"][0]["message"]["tool_calls"]:
            assert_valid_call(call["function"]["name"], call["function"]["arguments"])
        assert httpx.get(f"{url}/models").json()["models"][0]["backend"] == "vllm"

        named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": True}
        pieces = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=named, timeout=180) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces += (
                        json.loads(line[6:])["choices"][0]["delta"].get("tool_calls", [])
                        if json.loads(line[6:])["choices"]
                        else []
                    )
        assert pieces and pieces[0]["function"]["name"] == "get_weather"
        assert_valid_call("get_weather", "".join(p["function"].get("arguments", "") for p in pieces))

        ollama = {**named, "stream": False, "options": {"num_predict": 80}}
        r = httpx.post(f"{url}/api/chat", json=ollama, timeout=180)
        assert r.status_code == 200, r.text
        for call in r.json()["message"]["tool_calls"]:
            assert_valid_call(call["function"]["name"], call["function"]["arguments"])
