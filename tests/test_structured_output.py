"""Structured output in the engine: the constraint that OpenAI's `response_format` and Ollama's
`format` both map to, driven through the shared generation path (pool → runner), no HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jsonschema
import pytest

from errors import InvalidRequest
from runners import structured
from runners.base import GenerationRequest, ResponseFormat, SamplingOptions
from runners.generation import start_generation
from runners.pool import ModelPool
from settings import load_settings
from tests.support.fixtures import TINY_GPT2, TINY_LLAMA

# Bounded values only (enums, booleans, small integers, short arrays): a random-weight model has
# to finish within a few dozen tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["fast", "slow"]}, "maxItems": 2},
    },
    "required": ["ok", "level", "tags"],
    "additionalProperties": False,
}


@asynccontextmanager
async def model_pool(install_model, *models: tuple[Path, str]) -> AsyncIterator[ModelPool]:
    for src, repo in models:
        install_model(src, repo)
    pool = ModelPool(load_settings())
    try:
        yield pool
    finally:
        await pool.close()


async def generate(pool: ModelPool, model: str, request: GenerationRequest) -> tuple[str, str]:
    done = await (await start_generation(pool, model, request)).collect()
    return done.text, done.stats.finish_reason


async def test_json_schema_constrains_every_sample(install_model, tiny_llama_dir: Path) -> None:
    async with model_pool(install_model, (tiny_llama_dir, TINY_LLAMA)) as pool:
        for seed in range(4):
            request = GenerationRequest(
                messages=[{"role": "user", "content": "describe the server"}],
                options=SamplingOptions(temperature=1.0, seed=seed, max_tokens=80),
                response_format=ResponseFormat("json_schema", SCHEMA),
            )
            text, finish = await generate(pool, TINY_LLAMA, request)
            jsonschema.validate(json.loads(text), SCHEMA)
            assert list(json.loads(text)) == ["ok", "level", "tags"]  # in the schema's order
            assert finish == "stop"
            assert " " not in text.replace(", ", "").replace(": ", "")  # compact: no runs of whitespace


async def test_json_mode_on_a_raw_prompt_of_a_model_without_template(install_model, tiny_gpt2_dir: Path) -> None:
    """ "json" means any JSON object; strings are unbounded, so only the samples that finish are parsed."""
    async with model_pool(install_model, (tiny_gpt2_dir, TINY_GPT2)) as pool:
        finished = []
        for seed in range(48):
            request = GenerationRequest(
                prompt="Data:",
                options=SamplingOptions(temperature=1.0, seed=seed, max_tokens=8),
                response_format=ResponseFormat("json"),
            )
            text, finish = await generate(pool, TINY_GPT2, request)
            assert text.startswith("{")
            if finish == "stop":
                finished.append(json.loads(text))
        assert finished and all(isinstance(value, dict) for value in finished)


def test_a_schema_the_grammar_cannot_express_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="unsupported JSON schema") as caught:
        structured.validate(ResponseFormat("json_schema", {"type": "objectx"}))
    assert caught.value.param == "response_format"
    structured.validate(ResponseFormat("json_schema", SCHEMA))  # a good one passes
