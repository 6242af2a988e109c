"""Generated hostile input: schemathesis over /openapi.json, and NaN/Infinity/huge numbers in every
numeric field of every dialect. Whatever comes in, the answer is never a 5xx.

Both run against the real service app in-process, with a tiny model whose context is 32 tokens, so
requests that are accepted finish in a few decoding steps, and the local Hub for pulls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.tiny_models import build_tiny_llama

MODEL = "test-org/short"


def _examples(count: int) -> settings:
    """Reproducible runs of `count` examples (the server is shared by the examples on purpose)."""
    return settings(
        max_examples=count, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("short"), context=32)


@pytest.fixture
def client(serve, local_hub, install_model, short_model_dir: Path):
    """A reachable (local) Hub, so generated pulls end as they would: mostly "not found"."""
    install_model(short_model_dir, MODEL)
    return serve(BACKEND="transformers", MAX_REQUEST_BYTES="200000")


def test_no_generated_request_gets_a_server_error(client) -> None:
    """Every operation of the OpenAPI schema, with bodies schemathesis derives from it."""
    from service import app

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20

    @_examples(150)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        case = data.draw(operation.as_strategy())
        response = case.call()
        where = f"{case.method} {case.formatted_path}"
        assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"

    check()


# Each dialect's generation body, kept short; every numeric field is replaced in turn.
_BODIES: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/api/chat": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 2},
    },
    "/api/embed": {"model": MODEL, "input": "hi", "options": {}},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
    "/chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}
_OLLAMA_OPTIONS = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "num_predict",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
]
_OPENAI = [
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
]
_FIELDS: list[tuple[str, tuple[str, ...]]] = [
    *[(path, ("options", o)) for path in ("/api/generate", "/api/chat", "/api/embed") for o in _OLLAMA_OPTIONS],
    *[(path, ("keep_alive",)) for path in ("/api/generate", "/api/chat", "/api/embed")],
    ("/api/embed", ("dimensions",)),
    *[(path, (f,)) for path in ("/v1/chat/completions", "/v1/completions") for f in _OPENAI],
    ("/v1/chat/completions", ("max_completion_tokens",)),
    ("/v1/chat/completions", ("top_logprobs",)),
    ("/v1/completions", ("logprobs",)),
    ("/v1/embeddings", ("dimensions",)),
    ("/chat", ("max_tokens",)),
    ("/chat", ("temperature",)),
]
_EXTREMES = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        1e308,
        -1e308,
        5e-324,
        2**64,
        2**70,
        -(2**70),
        2**63,
        -(2**63) - 1,
        10**30,
        0,
        -1,
        1e-300,
    ]
)
_NUMBERS = _EXTREMES | st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(2**80), max_value=2**80)


@_examples(250)
@given(field=st.sampled_from(_FIELDS), value=_NUMBERS, as_string=st.booleans())
def test_extreme_numbers_in_every_numeric_field_are_never_a_server_error(client, field, value, as_string) -> None:
    path, location = field
    body = json.loads(json.dumps(_BODIES[path]))
    target = body
    for key in location[:-1]:
        target = target[key]
    target[location[-1]] = str(value) if as_string else value
    if location == ("top_logprobs",):
        body["logprobs"] = True  # top_logprobs alone is refused
    try:
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    except Exception as exc:  # the test client re-raises what the app did not handle: name the input
        raise AssertionError(f"{path} {location}={value!r} (as a string: {as_string}) raised {exc!r}") from exc
    assert response.status_code < 500, f"{path} {location}={value!r}: {response.status_code} {response.text}"
    if isinstance(value, float) and not math.isfinite(value) and not as_string:
        assert response.status_code == 400, f"{path} {location}={value!r} was accepted"
    response.json()
