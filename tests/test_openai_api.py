"""OpenAI's API (/v1) driven by the official `openai` client and LangChain's ChatOpenAI.

Most tests talk to the real server (`bentoml serve`, its own worker process, a real socket);
tests that need a fresh server or its internals use the in-process `serve` fixture, with the openai
client riding on its TestClient. Greedy (temperature 0) and seeded requests are deterministic, so
streamed, non-streamed and LangChain answers can be compared exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from transformers import AutoTokenizer

from tests.support.fixtures import TINY_GPT2, TINY_LLAMA
from tests.support.server_process import UNREACHABLE_HUB, current_runtime, running_server
from tests.support.tiny_models import build_remote_code_model, install_into_hf_cache

HELLO = [{"role": "user", "content": "hello"}]
# Bounded values only: a random-weight model must finish it within a few dozen tokens.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Iterator[str]:
    """The real server (`bentoml serve`) with both tiny models pulled; yields its base URL."""
    root = tmp_path_factory.mktemp("openai-live")
    for src, repo in ((tiny_llama_dir, TINY_LLAMA), (tiny_gpt2_dir, TINY_GPT2)):
        install_into_hf_cache(src, root / "hf" / "hub", repo)
    env = {
        "HF_HOME": str(root / "hf"),
        "HF_HUB_CACHE": str(root / "hf" / "hub"),
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "DATA_DIR": str(root / "data"),
        "BENTOML_HOME": str(root / "bentoml"),
    }
    with running_server(env, root / "server.log") as url:
        yield url


@pytest.fixture
def client(live: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def chat(client: openai.OpenAI, **params: object):
    return client.chat.completions.create(**{"model": TINY_LLAMA, "messages": HELLO, "temperature": 0, **params})


# -- chat completions ---------------------------------------------------------------------------


def test_chat_completion_has_openai_shape_and_true_usage(client: openai.OpenAI, tokenizer) -> None:
    r = chat(client, max_tokens=8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == TINY_LLAMA
    assert abs(r.created - time.time()) < 120
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and choice.logprobs is None
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(prompt) + 8
    assert chat(client, max_tokens=8).choices[0].message.content == choice.message.content  # greedy


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=16)
    chunks = list(chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    opening, *deltas, finish, usage = chunks
    assert opening.choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == opening.id for c in chunks)
    assert len(deltas) >= 2 and all(c.choices[0].finish_reason is None for c in deltas)
    assert "".join(c.choices[0].delta.content for c in deltas) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.choices == [] and usage.usage == whole.usage

    plain = list(chat(client, max_tokens=16, stream=True))  # no usage chunk unless asked
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage is None


def test_stream_is_server_sent_events_ending_in_done(live: str) -> None:
    body = {"model": TINY_LLAMA, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{live}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all("choices" in json.loads(line[6:]) for line in lines[:-1])


def test_stream_arrives_while_the_model_is_still_generating(client: openai.OpenAI) -> None:
    chat(client, max_tokens=1)  # loaded, so the clock below measures generation only
    started = time.monotonic()
    arrivals = [
        time.monotonic() - started
        for c in chat(client, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        if c.choices and c.choices[0].delta.content
    ]
    assert len(arrivals) >= 100
    assert arrivals[0] < arrivals[-1] / 2, "chunks were held back until the end"


def test_max_completion_tokens_wins_and_stop_sequences_finish_with_stop(client: openai.OpenAI) -> None:
    assert chat(client, max_tokens=10, max_completion_tokens=3).usage.completion_tokens == 3
    full = chat(client, max_tokens=12).choices[0].message.content
    stop = full[4:7]
    for stops in (stop, [stop, "no such text"]):
        r = chat(client, max_tokens=12, stop=stops)
        assert r.choices[0].message.content == full[: full.find(stop)]
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 12


def test_n_choices_of_one_prompt_share_its_usage(client: openai.OpenAI) -> None:
    one = chat(client, max_tokens=5)
    both = chat(client, max_tokens=5, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert all(c.message.content == one.choices[0].message.content for c in both.choices)  # greedy
    assert both.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    assert both.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_n_choices_decode_concurrently(client: openai.OpenAI) -> None:
    """Chunks of the two choices interleave: run one after the other, all of choice 0 would come first."""
    chunks = list(
        chat(
            client,
            n=2,
            max_tokens=96,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert order != sorted(order)
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in (0, 1)
    ]
    assert texts[0] == texts[1]
    assert chunks[-1].usage.completion_tokens == 2 * 96


def test_seeded_samples_differ_per_choice_and_repeat_exactly(client: openai.OpenAI) -> None:
    params = {"temperature": 1.0, "seed": 7, "n": 2, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    first = [c.message.content for c in chat(client, **params).choices]
    again = [c.message.content for c in chat(client, **params).choices]
    assert first == again
    assert first[0] != first[1]


def test_long_prompt_is_a_bad_request_streamed_or_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "word " * 600}]  # the tiny model's context is 512 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="context"):
            chat(client, messages=messages, stream=stream)


# -- structured output and logprobs -------------------------------------------------------------


def test_response_format_json_schema_output_validates(client: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    r = chat(client, temperature=1.0, seed=3, n=3, max_tokens=64, response_format=response_format)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), ANSWER_SCHEMA)
        assert choice.finish_reason == "stop"
    streamed = chat(client, temperature=1.0, seed=3, max_tokens=64, response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content


def test_response_format_json_object_gives_json_objects(client: openai.OpenAI) -> None:
    """Any object may hold a string without end, and this random model often writes one: of many
    samples, those that finish are JSON objects, and some do finish."""
    r = chat(client, temperature=1.0, seed=0, n=32, max_tokens=16, response_format={"type": "json_object"})
    finished = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)
    assert all(c.message.content.startswith("{") for c in r.choices)


def visible(tokens: list[str], tokenizer) -> str:
    """The text of generated tokens as the answer shows it: special tokens are reported, not shown."""
    return "".join(t for t in tokens if t not in tokenizer.all_special_tokens)


def test_chat_logprobs_are_the_model_distribution(client: openai.OpenAI, tokenizer) -> None:
    r = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == r.usage.completion_tokens == 6
    assert visible([t.token for t in tokens], tokenizer) == r.choices[0].message.content
    for t in tokens:
        assert t.bytes == list(t.token.encode())
        alternatives = [a.logprob for a in t.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert t.logprob == alternatives[0] < 0  # greedy picked the most likely token
        assert sum(math.exp(a) for a in alternatives) <= 1
    streamed = chat(client, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    assert [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content] == tokens


def test_completion_logprobs_have_offsets(client: openai.OpenAI, tokenizer) -> None:
    r = client.completions.create(model=TINY_LLAMA, prompt="The server", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert visible(lp.tokens, tokenizer) == r.choices[0].text


# -- text completions ---------------------------------------------------------------------------


def test_completions_for_a_prompt_list_times_n(client: openai.OpenAI, tokenizer) -> None:
    prompts = ["The model answers", "A server"]
    r = client.completions.create(
        model=TINY_LLAMA, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=1, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and c.text for c in r.choices)
    assert r.usage.prompt_tokens == sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert r.usage.completion_tokens == 4 * 6


def test_completion_streams_the_same_text_and_defaults_to_16_tokens(client: openai.OpenAI) -> None:
    params = {"model": TINY_LLAMA, "prompt": "The server", "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**params)
    assert whole.usage.completion_tokens == 16  # OpenAI's and vLLM's default max_tokens here
    chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage == whole.usage


# -- models and embeddings ----------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = client.models.list()
    assert {m.id for m in listed.data} == {TINY_LLAMA, TINY_GPT2}
    model = client.models.retrieve(TINY_LLAMA)
    assert (model.id, model.object, model.owned_by) == (TINY_LLAMA, "model", "test-org")
    assert model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("test-org/not-pulled")
    with pytest.raises(openai.BadRequestError):
        client.models.retrieve("not a name")


def test_embeddings_float_and_base64(client: openai.OpenAI, live: str, tokenizer) -> None:
    texts = ["the model answers", "a much longer sentence about a server that streams tokens to its clients"]
    r = client.embeddings.create(model=TINY_LLAMA, input=texts)  # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == TINY_LLAMA and [d.index for d in r.data] == [0, 1]
    vectors = [d.embedding for d in r.data]
    assert len(vectors[0]) == len(vectors[1]) == 64  # the tiny llama's hidden size
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-5) for v in vectors)
    assert sum(a * b for a, b in zip(*vectors, strict=True)) < 0.999  # different texts, different vectors
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)

    floats = httpx.post(
        f"{live}/v1/embeddings", json={"model": TINY_LLAMA, "input": texts, "encoding_format": "float"}, timeout=60
    ).json()
    for d, v in zip(floats["data"], vectors, strict=True):
        assert d["object"] == "embedding" and d["embedding"] == pytest.approx(v, rel=1e-6)
    alone = client.embeddings.create(model=TINY_LLAMA, input=texts[0]).data[0].embedding
    assert alone == pytest.approx(vectors[0], abs=1e-5)  # padding in a batch changes nothing


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions", "embeddings"])
def test_unknown_model_raises_not_found(client: openai.OpenAI, endpoint: str) -> None:
    call = {
        "chat": lambda: client.chat.completions.create(model="someone/not-pulled", messages=HELLO),
        "completions": lambda: client.completions.create(model="someone/not-pulled", prompt="x"),
        "embeddings": lambda: client.embeddings.create(model="someone/not-pulled", input="x"),
    }[endpoint]
    with pytest.raises(openai.NotFoundError) as caught:
        call()
    assert caught.value.type == "not_found_error" and caught.value.param == "model"
    assert "pull" in caught.value.message


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"model": "../etc/passwd"}, "model"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"top_logprobs": 2}, None),
        ({"stream_options": {"include_usage": True}}, None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
            "response_format",
        ),
    ],
)
def test_bad_requests_raise_bad_request_error_before_loading(
    serve, install_model, tiny_llama_dir: Path, params: dict, param: str | None
) -> None:
    install_model(tiny_llama_dir, TINY_LLAMA)
    http = serve()
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": TINY_LLAMA, "messages": HELLO, **params})
    assert caught.value.type == "invalid_request_error"
    if param:
        assert caught.value.param == param
    assert current_runtime().pool.loaded() == []  # refused before any model was loaded


@pytest.mark.parametrize(
    ("endpoint", "params", "param"),
    [
        ("completions", {"echo": True}, "echo"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"prompt": []}, "prompt"),
        ("embeddings", {"dimensions": 8}, "dimensions"),
        ("embeddings", {"input": ""}, "input"),
        ("embeddings", {"input": [1, 2, 3]}, None),  # token ids: of which tokenizer?
    ],
)
def test_bad_completion_and_embedding_requests(
    client: openai.OpenAI, endpoint: str, params: dict, param: str | None
) -> None:
    create = client.completions.create if endpoint == "completions" else client.embeddings.create
    defaults = {"prompt": "x"} if endpoint == "completions" else {"input": "x"}
    with pytest.raises(openai.BadRequestError) as caught:
        create(**{"model": TINY_LLAMA, **defaults, **params})
    assert caught.value.type == "invalid_request_error"
    if param:
        assert caught.value.param == param


def test_api_keys_raise_authentication_error(serve, install_model, tiny_llama_dir: Path) -> None:
    install_model(tiny_llama_dir, TINY_LLAMA)
    http = serve(API_KEYS="secret")
    wrong = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="secret", http_client=http, max_retries=0)
    assert [m.id for m in right.models.list().data] == [TINY_LLAMA]


_FAULTY_MODELING = '''"""A test model that fails once its sequence grows past `fail_after` tokens (mid-stream)."""

from transformers import LlamaForCausalLM

from .configuration_custom import CustomLlamaConfig


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig

    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if seen + input_ids.shape[1] > self.config.fail_after:
            raise RuntimeError("simulated device fault")
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
'''


def test_failure_after_the_stream_began_is_an_error_event(serve, install_model, tmp_path: Path) -> None:
    src = build_remote_code_model(tmp_path / "faulty")
    (src / "modeling_custom.py").write_text(_FAULTY_MODELING)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "fail_after": 16}))
    install_model(src, "test-org/faulty")
    http = serve(TRUST_REMOTE_CODE_MODELS="test-org/faulty")

    body = {"model": "test-org/faulty", "messages": HELLO, "max_tokens": 50, "temperature": 0, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200  # the fault came after the first tokens were sent
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert any(json.loads(e)["choices"] and json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1])
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "simulated device fault" in error["message"]
    assert "[DONE]" not in events

    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)
    with pytest.raises(openai.APIError, match="simulated device fault"):
        list(client.chat.completions.create(**body))
    assert current_runtime().pool.get_loaded("test-org/faulty").active == 0  # the lease was given back


# -- LangChain ----------------------------------------------------------------------------------


def test_langchain_chat_openai_invokes_and_streams(client: openai.OpenAI, live: str) -> None:
    expected = chat(client, max_completion_tokens=12).choices[0].message.content
    llm = ChatOpenAI(
        base_url=f"{live}/v1", api_key="unused", model=TINY_LLAMA, temperature=0, max_tokens=12, max_retries=0
    )
    message = llm.invoke("hello")
    assert message.content == expected
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 12
    chunks = list(llm.stream("hello"))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == expected
