"""Model names (runners/names.py): a repo id with an optional Ollama-style tag, validated before
anything touches the disk or the network."""

from __future__ import annotations

import pytest

from errors import InvalidModelName
from runners.names import ModelRef, parse_model_name


@pytest.mark.parametrize(
    ("raw", "ref"),
    [
        ("org/model", ModelRef("org/model")),
        ("  org/model  ", ModelRef("org/model")),
        ("gpt2", ModelRef("gpt2")),
        ("org/model:latest", ModelRef("org/model")),
        ("org/model:main", ModelRef("org/model")),
        ("org/model:v1.0", ModelRef("org/model", "v1.0")),
        ("Org-1/Model_2.5", ModelRef("Org-1/Model_2.5")),
    ],
)
def test_valid_names_parse_to_their_repo_and_revision(raw: str, ref: ModelRef) -> None:
    assert parse_model_name(raw) == ref


@pytest.mark.parametrize(
    "raw",
    ["", "   ", None, 7, "../../etc", "org/../x", "a/b/c", "org--x/model", "org/model:", "org/model:-x", "x" * 97],
)
def test_invalid_names_are_a_400_naming_the_model_field(raw: object) -> None:
    with pytest.raises(InvalidModelName) as error:
        parse_model_name(raw)
    assert error.value.param == "model"


def test_canonical_and_tagged_names() -> None:
    assert parse_model_name("org/m").name == "org/m" and parse_model_name("org/m").tagged_name == "org/m:latest"
    tagged = parse_model_name("org/m:v2")
    assert tagged.name == "org/m:v2" and tagged.tagged_name == "org/m:v2"
