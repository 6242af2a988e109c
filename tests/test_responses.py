"""OpenAI's Responses API against the real server: the official `openai` client and the OpenAI
Agents SDK, stored conversations across a restart, both engines.

Calls are forced with `tool_choice` (a grammar enforces them, whatever the random weights), on
bounded schemas (enums, booleans), so every function_call must validate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest

from tests.support.fixtures import TINY_LLAMA
from tests.support.tool_models import (
    CALL_BUDGET,
    QWEN,
    SCHEMAS,
    assert_valid_call,
    rendered_length,
)

TOOLS = [
    {"type": "function", "name": name, "description": f"the {name} tool", "parameters": schema}
    for name, schema in SCHEMAS.items()
]


@pytest.fixture
def serve_models(serve, install_model, qwen_dir: Path, tiny_llama_dir: Path):
    install_model(qwen_dir, QWEN)
    install_model(tiny_llama_dir, TINY_LLAMA)
    return lambda **env: serve(BACKEND="transformers", MAX_CACHE_MODELS="2", **env)


@pytest.fixture
def client(serve_models):
    return serve_models()


def sdk(client):
    from openai import OpenAI

    return OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def test_create_text_response(client, tiny_llama_dir: Path) -> None:
    response = sdk(client).responses.create(
        model=TINY_LLAMA, input="Hello", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    assert response.object == "response" and response.id.startswith("resp_") and response.model == TINY_LLAMA
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and response.output_text == message.content[0].text != ""
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert response.usage.input_tokens == rendered_length(tiny_llama_dir, sent)
    assert response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6


def test_streaming_events_in_openais_order(client) -> None:
    api = sdk(client)
    stream = api.responses.create(model=TINY_LLAMA, input="Hi", max_output_tokens=8, temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and events[-4].text == text and final.usage.output_tokens == 8
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2]) and final.output[0].id == item_id
    # Greedy decoding: the same text as without streaming.
    assert api.responses.create(model=TINY_LLAMA, input="Hi", max_output_tokens=8, temperature=0).output_text == text


def test_forced_function_call_then_its_output(client, qwen_dir: Path) -> None:
    api = sdk(client)
    first = api.responses.create(
        model=QWEN,
        input="Weather in Oslo?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=CALL_BUDGET,
        store=False,
    )
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    [call] = calls
    args = assert_valid_call(call.name, call.arguments)
    assert call.call_id and call.id.startswith("fc_") and call.status == "completed"

    items = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    second = api.responses.create(model=QWEN, input=items, tools=TOOLS, max_output_tokens=4, store=False)
    expected = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": args}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["parameters"]},
        }
        for t in TOOLS
    ]
    assert second.usage.input_tokens == rendered_length(qwen_dir, expected, tools=tools)


def test_input_items_of_a_stored_response(client) -> None:
    api = sdk(client)
    items = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "noon"},
    ]
    response = api.responses.create(model=QWEN, input=items, tools=TOOLS, max_output_tokens=2)
    listed = api.responses.input_items.list(response.id, order="asc")
    assert [item.type for item in listed.data] == ["message", "function_call", "function_call_output"]
    assert listed.data[0].content[0].type == "input_text" and listed.data[0].content[0].text == "Weather in Oslo?"
    assert listed.data[1].call_id == "call_1" and listed.data[2].output == "noon"
    newest_first = api.responses.input_items.list(response.id, limit=2)
    assert [item.id for item in newest_first.data] == [listed.data[2].id, listed.data[1].id]
    assert newest_first.has_more
    rest = api.responses.input_items.list(response.id, limit=2, after=newest_first.last_id)
    assert [item.id for item in rest.data] == [listed.data[0].id] and not rest.has_more


def test_named_function_streams_name_first_then_arguments(client) -> None:
    stream = sdk(client).responses.create(
        model=QWEN,
        input="time?",
        tools=TOOLS,
        max_output_tokens=CALL_BUDGET,
        stream=True,
        tool_choice={"type": "function", "name": "get_time"},
    )
    events = list(stream)
    [added] = [e for e in events if e.type == "response.output_item.added"]
    assert added.item.type == "function_call" and added.item.name == "get_time" and added.item.arguments == ""
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    arguments = "".join(e.delta for e in deltas)
    assert_valid_call("get_time", arguments)
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments and all(e.item_id == added.item.id for e in deltas)
    assert events[-1].type == "response.completed" and events[-1].response.output[0].arguments == arguments

    # The SDK's stream helper rebuilds the response from the events (and checks their identities).
    with sdk(client).responses.stream(
        model=QWEN,
        input="time?",
        tools=TOOLS,
        max_output_tokens=CALL_BUDGET,
        tool_choice={"type": "function", "name": "get_time"},
    ) as stream:
        final = stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_time"
    assert_valid_call("get_time", call.arguments)


def test_previous_response_id_survives_a_restart(serve_models, tiny_llama_dir: Path) -> None:
    api = sdk(serve_models())
    first = api.responses.create(model=TINY_LLAMA, input="My name is Ada.", max_output_tokens=4, temperature=0)
    assert first.store is True

    api = sdk(serve_models())  # a new server process on the same database
    assert api.responses.retrieve(first.id).output_text == first.output_text
    second = api.responses.create(
        model=TINY_LLAMA,
        input="What is my name?",
        previous_response_id=first.id,
        instructions="Answer briefly.",
        max_output_tokens=4,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage.input_tokens == rendered_length(tiny_llama_dir, history)
    # Instructions do not carry over: the third turn's prompt has the conversation but no system message.
    third = api.responses.create(model=TINY_LLAMA, input="Again?", previous_response_id=second.id, max_output_tokens=1)
    history = [
        *history[1:],
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Again?"},
    ]
    assert third.usage.input_tokens == rendered_length(tiny_llama_dir, history)


def test_replicas_share_conversations_through_database_url(serve_models, tmp_path: Path) -> None:
    """Two servers (one after the other: one service per test process) with their own data folders
    and one DATABASE_URL (a shared SQLite file standing in for the Postgres a deployment would
    use): a conversation begun on one continues on the other."""
    shared = {"DATABASE_URL": f"sqlite:///{tmp_path / 'shared' / 'ai-server.db'}"}
    first = sdk(serve_models(DATA_DIR=str(tmp_path / "replica-a"), **shared)).responses.create(
        model=TINY_LLAMA, input="hi", max_output_tokens=2
    )
    other = sdk(serve_models(DATA_DIR=str(tmp_path / "replica-b"), **shared))
    second = other.responses.create(model=TINY_LLAMA, input="again", previous_response_id=first.id, max_output_tokens=2)
    assert second.usage.input_tokens > first.usage.input_tokens
    assert other.responses.retrieve(first.id).id == first.id


def test_store_false_retrieve_and_delete(client) -> None:
    from openai import NotFoundError

    api = sdk(client)
    kept = api.responses.create(model=TINY_LLAMA, input="hi", max_output_tokens=2)
    assert api.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    api.responses.delete(kept.id)
    with pytest.raises(NotFoundError):
        api.responses.retrieve(kept.id)
    with pytest.raises(NotFoundError):
        api.responses.delete(kept.id)
    with pytest.raises(NotFoundError) as missing:
        api.responses.create(model=TINY_LLAMA, input="hi", previous_response_id=kept.id, max_output_tokens=2)
    assert missing.value.body["param"] == "previous_response_id"

    unstored = api.responses.create(model=TINY_LLAMA, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(NotFoundError):
        api.responses.retrieve(unstored.id)


def test_retention_bounds_what_is_kept(serve_models) -> None:
    import time

    from openai import NotFoundError

    api = sdk(serve_models(RESPONSES_RETENTION="1s"))
    old = api.responses.create(model=TINY_LLAMA, input="hi", max_output_tokens=2)
    time.sleep(1.5)
    with pytest.raises(NotFoundError):
        api.responses.retrieve(old.id)
    fresh = api.responses.create(model=TINY_LLAMA, input="hi", max_output_tokens=2)  # writing prunes the old row
    assert api.responses.retrieve(fresh.id).id == fresh.id
    from sqlmodel import Session

    from jobs.responses_store import StoredResponse
    from service import app

    with Session(app.state.runtime.responses.engine) as session:
        assert session.get(StoredResponse, old.id) is None


def test_bad_requests_are_openai_400s(client) -> None:
    from openai import BadRequestError, NotFoundError

    api = sdk(client)
    with pytest.raises(NotFoundError):
        api.responses.create(model="nobody/nothing", input="hi")
    with pytest.raises(BadRequestError, match="not supported"):
        api.responses.create(
            model=TINY_LLAMA,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}],
        )
    with pytest.raises(BadRequestError, match="not one of `tools`"):
        api.responses.create(model=QWEN, input="hi", tools=TOOLS, tool_choice={"type": "function", "name": "nope"})
    r = client.post("/v1/responses", json={"model": TINY_LLAMA, "input": "hi", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "'web_search' are not supported" in r.json()["error"]["message"]


def test_json_schema_text_format(client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    response = sdk(client).responses.create(
        model=TINY_LLAMA,
        input="JSON please",
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert response.status == "completed"
    assert isinstance(json.loads(response.output_text)["ok"], bool)
    assert response.text.format.type == "json_schema"


# -- on a real socket: the OpenAI Agents SDK, and the vLLM engine -------------------------------------


def run_weather_agent(url: str, streamed: bool = False) -> None:
    """One agent with one function tool: the call is forced (tool_choice="required") and the run
    ends on it (stop_on_first_tool), so the tool's own return value is the final output."""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    calls: list[tuple[str, bool]] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"], metric: bool) -> str:
        """The weather in a city."""
        calls.append((city, metric))
        return f"sunny in {city}"

    model = OpenAIResponsesModel(
        model=QWEN, openai_client=AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180, max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="Answer with the tool.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=CALL_BUDGET),
        tool_use_behavior="stop_on_first_tool",
    )
    if streamed:

        async def run_streamed():
            result = Runner.run_streamed(agent, "Weather in Rome?")
            kinds = [event.type async for event in result.stream_events()]
            assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
            return result

        result = asyncio.run(run_streamed())
    else:
        result = Runner.run_sync(agent, "Weather in Rome?")
    assert len(calls) == 1 and calls[0][0] in ("Paris", "Rome", "Oslo") and isinstance(calls[0][1], bool)
    assert result.final_output == f"sunny in {calls[0][0]}"


class TestAgentsSdk:
    @pytest.fixture(scope="class")
    def url(self, tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path):
        from tests.support.server_process import in_process_env, in_process_server

        env = in_process_env(tmp_path_factory.mktemp("agents"), {QWEN: qwen_dir}, "transformers")
        with in_process_server(env) as url:
            yield url

    def test_agent_calls_its_function_tool(self, url: str) -> None:
        run_weather_agent(url)

    def test_streamed_agent_run(self, url: str) -> None:
        run_weather_agent(url, streamed=True)


class TestOnVllm:
    @pytest.fixture(scope="class")
    def url(self, tmp_path_factory: pytest.TempPathFactory, qwen_dir: Path):
        from tests.support.server_process import in_process_env, in_process_server

        env = in_process_env(tmp_path_factory.mktemp("vllm-responses"), {QWEN: qwen_dir}, "vllm")
        with in_process_server(env) as url:
            yield url

    def test_stream_forced_call_previous_response_and_agent(self, url: str) -> None:
        import httpx
        from openai import OpenAI

        api = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180, max_retries=0)
        events = list(
            api.responses.create(model=QWEN, input="Hi", max_output_tokens=6, stream=True, reasoning={"effort": "none"})
        )
        assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
        first = events[-1].response
        assert first.usage.output_tokens > 0
        called = api.responses.create(
            model=QWEN,
            input="Weather?",
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=CALL_BUDGET,
            previous_response_id=first.id,
        )
        [call] = [item for item in called.output if item.type == "function_call"]
        assert_valid_call(call.name, call.arguments)
        assert called.usage.input_tokens > first.usage.input_tokens  # the first turn is in the prompt
        run_weather_agent(url)
        assert httpx.get(f"{url}/models").json()["models"][0]["backend"] == "vllm"
