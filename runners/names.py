"""Model names: a Hugging Face repo id, optionally with an Ollama-style `:tag` naming a revision.

Names are validated before anything touches the disk or the network, so a path like
`../../etc` can never become a cache path or a Hub URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from errors import InvalidModelName

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model name. `revision` None means the repo's default branch."""

    repo_id: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """The canonical name: the repo id, plus `:revision` when it is not the default."""
        return self.repo_id if self.revision is None else f"{self.repo_id}:{self.revision}"

    @property
    def tagged_name(self) -> str:
        """The Ollama-style name that always carries a tag (`org/model:latest`)."""
        return f"{self.repo_id}:{self.revision or DEFAULT_TAG}"


def parse_model_name(raw: object) -> ModelRef:
    """Parse and validate `repo_id[:tag]`; raise InvalidModelName (HTTP 400) when it is not one."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidModelName("model name is required", param="model")
    text = raw.strip()
    repo_id, sep, tag = text.partition(":")
    if sep and not _REVISION.fullmatch(tag):
        raise InvalidModelName(f"invalid model tag {tag!r} in {text!r}", param="model")
    if len(repo_id) > 96 or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidModelName(
            f"invalid model name {text!r}: expected a Hugging Face repo id like 'org/name' or 'name'",
            param="model",
        )
    revision = None if not sep or tag == DEFAULT_TAG or tag == "main" else tag
    return ModelRef(repo_id=repo_id, revision=revision)
