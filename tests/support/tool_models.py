"""The tiny tool-calling models and bounded tool schemas every dialect's tool tests share.

Random weights never choose to call a tool, so tests force calls (`tool_choice`), which the server
enforces with a grammar; schemas hold only enums and booleans, so a random model cannot wander off
into an endless string and every call it makes must validate.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

QWEN = "test-org/tiny-qwen-tools"  # the qwen_dir fixture's model: Hermes tool calls and <think> reasoning
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA},
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": TIME_SCHEMA}}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
# Tokens for one forced call: it ends when the grammar completes, so room to spare costs nothing,
# and a random model may spend a blank between any two JSON tokens.
CALL_BUDGET = 200


def assert_valid_call(name: str, arguments: str | dict) -> dict:
    """The call's arguments, validated against its tool's schema."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def rendered_length(model_dir: Path, messages: list[dict], tools: list[dict] | None = None, **kwargs: object) -> int:
    """Tokens of the prompt the model's own template makes of `messages` (the truth to compare with)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
