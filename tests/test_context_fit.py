"""Long chats are fitted to the context Ollama's way (oldest turns dropped, system and last kept);
the OpenAI dialect refuses them as vLLM does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import TINY_LLAMA

NUM_CTX = 160


@pytest.fixture
def client(serve, install_model, tiny_llama_dir: Path):
    install_model(tiny_llama_dir, TINY_LLAMA)
    return serve(BACKEND="transformers")


def prompt_tokens(model_dir: Path, messages: list[dict]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def long_chat(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a terse assistant."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"question {i}: tell me about the sea and the wind"},
            {"role": "assistant", "content": f"answer {i}: the sea is wide and the wind is strong"},
        ]
    return [*messages, {"role": "user", "content": "and the boat?"}]


def test_ollama_drops_the_oldest_turns_and_keeps_system_and_last(client, tiny_llama_dir: Path) -> None:
    messages = long_chat(12)
    assert prompt_tokens(tiny_llama_dir, messages) > NUM_CTX
    r = client.post(
        "/api/chat",
        json={
            "model": TINY_LLAMA,
            "messages": messages,
            "stream": False,
            "options": {"num_ctx": NUM_CTX, "num_predict": 4},
        },
    )
    assert r.status_code == 200, r.text
    got = r.json()["prompt_eval_count"]
    # The kept history is the system message plus the newest turns that fit with room to answer.
    room = min(4, NUM_CTX // 4)
    candidates = [[messages[0], *messages[k:]] for k in range(1, len(messages))]
    fitting = [m for m in candidates if prompt_tokens(tiny_llama_dir, m) + room <= NUM_CTX]
    assert got == prompt_tokens(tiny_llama_dir, fitting[0])  # the longest history that fits
    assert fitting[0][0]["role"] == "system" and fitting[0][-1] == messages[-1]
    assert len(fitting[0]) < len(messages)


def test_the_last_message_alone_too_long_is_a_400(client) -> None:
    long = "the sea " * 60  # ~120 tokens: fits the characters bound, not the room to answer
    r = client.post(
        "/api/chat",
        json={
            "model": TINY_LLAMA,
            "stream": False,
            "options": {"num_ctx": NUM_CTX},
            "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": long}],
        },
    )
    assert r.status_code == 400 and f"context is {NUM_CTX} tokens" in r.json()["error"]
    huge = "the sea " * 400
    r = client.post(
        "/api/chat",
        json={
            "model": TINY_LLAMA,
            "stream": False,
            "options": {"num_ctx": NUM_CTX},
            "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": huge}],
        },
    )
    assert r.status_code == 400 and f"context of {NUM_CTX} tokens" in r.json()["error"]  # refused by length


def test_openai_refuses_a_chat_longer_than_the_context(client) -> None:
    r = client.post("/v1/chat/completions", json={"model": TINY_LLAMA, "messages": long_chat(40), "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages" and "context" in r.json()["error"]["message"]
