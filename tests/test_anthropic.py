"""Anthropic's Messages API against the real server, with the official `anthropic` client.

The tiny Qwen-style model has a Hermes tool template and <think> reasoning; random weights never
choose to call a tool, so calls are forced (`tool_choice: {type: "any"}` or a named tool), which the
server enforces with a grammar: the tool_use block must validate against the tool's schema.
Greedy decoding (temperature 0) keeps the plain-text tests' outputs the same on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures import TINY_LLAMA
from tests.support.tool_models import (
    CALL_BUDGET,
    QWEN,
    SCHEMAS,
    WEATHER,
    assert_valid_call,
    rendered_length,
)

# The current SDK no longer has sampling parameters; the API (and older clients, Claude Code) still send them.
GREEDY = {"temperature": 0}
ANY_ONE = {"type": "any", "disable_parallel_tool_use": True}  # one forced call: it fits max_tokens
TOOLS = [{"name": name, "description": f"the {name} tool", "input_schema": schema} for name, schema in SCHEMAS.items()]


@pytest.fixture
def client(serve, install_model, qwen_dir: Path, tiny_llama_dir: Path):
    install_model(qwen_dir, QWEN)
    install_model(tiny_llama_dir, TINY_LLAMA)
    return serve(BACKEND="transformers", MAX_CACHE_MODELS="2")


def sdk(client, api_key: str = "unused"):
    import anthropic

    return anthropic.Anthropic(base_url=str(client.base_url), api_key=api_key, http_client=client, max_retries=0)


def test_create_answers_with_a_text_block_and_true_counts(client, tiny_llama_dir: Path) -> None:
    message = sdk(client).messages.create(
        model=TINY_LLAMA,
        max_tokens=6,
        system="Be brief.",
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert message.type == "message" and message.role == "assistant" and message.model == TINY_LLAMA
    assert message.id.startswith("msg_")
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("max_tokens", "end_turn") and message.stop_sequence is None
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert message.usage.input_tokens == rendered_length(tiny_llama_dir, sent, enable_thinking=False)
    assert 0 < message.usage.output_tokens <= 6
    assert (message.stop_reason == "max_tokens") == (message.usage.output_tokens == 6)


def test_stream_text_and_events_in_anthropics_order(client) -> None:
    api = sdk(client)
    kwargs = {"model": TINY_LLAMA, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    with api.messages.stream(**kwargs, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.usage.output_tokens == 8 and final.stop_reason == "max_tokens"
    counted = api.messages.count_tokens(model=TINY_LLAMA, messages=kwargs["messages"])
    assert final.usage.input_tokens == counted.input_tokens

    with client.stream("POST", "/v1/messages", json={**kwargs, **GREEDY, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    payloads = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert all(p["type"] == name for p, name in zip(payloads, names, strict=True))
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = payloads[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert payloads[1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(p["delta"]["text"] for p in payloads[3:-3]) == text  # greedy: the same text
    assert payloads[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert payloads[-2]["usage"] == {"output_tokens": 8}


def assert_stop_sequence_reported(api, model: str) -> None:
    """A stop sequence taken from the greedy answer itself ends the answer just before it, and
    Anthropic's `stop_reason`/`stop_sequence` say which one (JSON and stream)."""
    kwargs = {"model": model, "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}], "extra_body": GREEDY}
    full = api.messages.create(**kwargs).content[0].text
    stop = full[len(full) // 2 :][:2]
    assert stop.strip(), f"no usable stop sequence in {full!r}"
    expected = full[: full.find(stop)]
    stops = ["never-in-a-tiny-model's-output", stop]
    message = api.messages.create(**kwargs, stop_sequences=stops)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in message.content) == expected
    with api.messages.stream(**kwargs, stop_sequences=stops) as stream:
        assert "".join(stream.text_stream) == expected
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_stop_sequences_are_reported(client) -> None:
    assert_stop_sequence_reported(sdk(client), TINY_LLAMA)


def test_forced_tool_use_json_and_stream(client) -> None:
    api = sdk(client)
    kwargs = {
        "model": QWEN,
        "max_tokens": CALL_BUDGET,
        "tools": TOOLS,
        "tool_choice": ANY_ONE,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
    }
    message = api.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and all(b.type in ("tool_use", "thinking") for b in message.content)
    for call in calls:
        assert call.id and isinstance(call.input, dict)
        assert_valid_call(call.name, call.input)

    named = {**kwargs, "tool_choice": {"type": "tool", "name": "get_time"}}
    with api.messages.stream(**named) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"] and starts[0].content_block.name == "get_time"
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert_valid_call("get_time", partial)
    [block] = final.content
    assert block.type == "tool_use" and block.input == json.loads(partial)
    assert final.stop_reason == "tool_use"


def test_tool_result_turn_reaches_the_prompt(client, qwen_dir: Path) -> None:
    """A tool_use turn and its tool_result become the template's tool call and tool message."""
    api = sdk(client)
    first = api.messages.create(
        model=QWEN,
        max_tokens=CALL_BUDGET,
        tools=TOOLS[:1],
        tool_choice=ANY_ONE,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
    )
    [call] = [b for b in first.content if b.type == "tool_use"][:1]
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "21 degrees"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    second = api.messages.create(model=QWEN, max_tokens=4, tools=TOOLS[:1], messages=history)
    assert second.stop_reason in ("max_tokens", "end_turn", "tool_use")
    expected = [
        history[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.input}}],
        },
        {"role": "tool", "content": "21 degrees"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert second.usage.input_tokens == rendered_length(qwen_dir, expected, tools=[WEATHER], enable_thinking=False)
    counted = api.messages.count_tokens(model=QWEN, tools=TOOLS[:1], messages=history)
    assert counted.input_tokens == second.usage.input_tokens


def test_thinking_turns_the_template_switch_and_streams_thinking_blocks(client, qwen_dir: Path) -> None:
    api = sdk(client)
    messages = [{"role": "user", "content": "Think first."}]
    with api.messages.stream(
        model=QWEN, max_tokens=12, messages=messages, thinking={"type": "enabled", "budget_tokens": 1024}
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.usage.input_tokens == rendered_length(qwen_dir, messages, enable_thinking=True)
    # The template leaves reasoning open, so the model's first tokens are read as thinking.
    assert final.content[0].type == "thinking" and final.content[0].thinking
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == 0]
    assert {d.type for d in deltas[:-1]} == {"thinking_delta"} and deltas[-1].type == "signature_delta"
    assert "".join(d.thinking for d in deltas[:-1]) == final.content[0].thinking

    off = api.messages.create(model=QWEN, max_tokens=2, messages=messages)
    assert off.usage.input_tokens == rendered_length(qwen_dir, messages, enable_thinking=False)


def test_claude_code_request_shape(client) -> None:
    """The body Claude Code sends (system and text blocks with cache_control, JSON-Schema-draft
    tool schemas, metadata, beta headers, streaming, tool_choice left to the model), raw."""
    properties = {"command": {"type": "string", "description": "The command to run"}, "timeout": {"type": "number"}}
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": ["command"],
    }
    body = {
        "model": QWEN,
        "max_tokens": 16,
        "stream": True,
        "temperature": 1,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                    {"type": "text", "text": "list the files", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        "tools": [{"name": "Bash", "description": "Run a shell command", "input_schema": schema}],
        "metadata": {"user_id": "user_abc_account__session_123"},
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "x-api-key": "unused",
        "anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming-2025-05-14",
    }
    with client.stream("POST", "/v1/messages?beta=true", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"] and "error" not in names


def test_errors_are_in_anthropics_shape(client) -> None:
    import anthropic

    api = sdk(client)
    with pytest.raises(anthropic.NotFoundError) as missing:
        api.messages.create(model="nobody/nothing", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    assert "nobody/nothing" in missing.value.body["error"]["message"]

    r = client.post("/v1/messages", json={"model": TINY_LLAMA, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError):
        api.messages.create(model=TINY_LLAMA, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="server tools"):
        api.messages.create(
            model=QWEN,
            max_tokens=4,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
            messages=[{"role": "user", "content": "hi"}],
        )
    with pytest.raises(anthropic.BadRequestError, match="not one of `tools`"):
        api.messages.create(
            model=QWEN,
            max_tokens=4,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "nope"},
            messages=[{"role": "user", "content": "hi"}],
        )


def test_api_keys_accept_x_api_key_and_bearer(serve, install_model, tiny_llama_dir: Path) -> None:
    import anthropic

    install_model(tiny_llama_dir, TINY_LLAMA)
    client = serve(BACKEND="transformers", API_KEYS="sekrit")
    body = {"model": TINY_LLAMA, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    message = sdk(client, api_key="sekrit").messages.create(**body)  # the client sends x-api-key
    assert message.usage.output_tokens > 0
    r = client.post(
        "/v1/messages",
        json=body,
        headers={
            "Authorization": "Bearer sekrit",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "interleaved-thinking-2025-05-14",
        },
    )
    assert r.status_code == 200, r.text
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk(client, api_key="wrong").messages.create(**body)
    assert refused.value.body["error"]["type"] == "authentication_error"


class TestOnVllm:
    @pytest.fixture(scope="class")
    def url(self, tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path):
        from tests.support.server_process import in_process_env, in_process_server

        env = in_process_env(tmp_path_factory.mktemp("vllm-anthropic"), {QWEN: qwen_dir}, "vllm")
        with in_process_server(env) as url:
            yield url

    def test_text_and_forced_tool_use(self, url: str) -> None:
        import anthropic

        api = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=180)
        with api.messages.stream(model=QWEN, max_tokens=6, messages=[{"role": "user", "content": "Hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert final.usage.output_tokens > 0 and final.content[0].type == "text" and final.content[0].text == text
        message = api.messages.create(
            model=QWEN,
            max_tokens=CALL_BUDGET,
            tools=TOOLS,
            tool_choice=ANY_ONE,
            messages=[{"role": "user", "content": "Weather?"}],
        )
        assert message.stop_reason == "tool_use"
        for block in message.content:
            assert block.type == "tool_use"
            assert_valid_call(block.name, block.input)
        assert httpx.get(f"{url}/models").json()["models"][0]["backend"] == "vllm"
        assert_stop_sequence_reported(api, QWEN)
