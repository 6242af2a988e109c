"""The server's configuration: one typed object read from the environment.

Every variable in shared/SPEC.md lives here. An invalid value stops the server at startup with a
message naming the variable, instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
# Go's longest time.Duration (2**63-1 ns, about 292 years): Ollama's "forever"; anything longer is the same.
MAX_DURATION_SECONDS = (2**63 - 1) / 1e9
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks


def parse_duration(value: object) -> float | None:
    """Parse an Ollama/Go-style keep-alive duration into seconds.

    Accepts numbers (seconds) and Go durations such as "5m", "1h30m", "250ms". A negative value
    means "forever" and is returned as None, as is one longer than Go's longest duration (which is
    how Ollama spells forever). NaN and infinities are refused.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"invalid duration {value!r}: use seconds or e.g. '5m', '1h', '30s'") from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds")
    return None if seconds < 0 or seconds >= MAX_DURATION_SECONDS else seconds


def _split_mapping(value: object) -> dict[str, str]:
    """`org/model=name,other/model=name` as a dict (a dict passes through)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    mapping = {}
    for item in _split_list(value):
        key, sep, name = item.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise ValueError(f"expected repo_id=parser pairs separated by commas, got {item!r}")
        mapping[key.strip()] = name.strip()
    return mapping


def _split_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, Iterable):
        return list(value)
    raise ValueError(f"expected a comma-separated list, got {value!r}")


class Settings(BaseSettings):
    """Server settings; each field is read from the upper-cased environment variable."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=())

    max_cache_models: int = Field(2, ge=1, description="models kept loaded (LRU)")
    model_memory_budget_bytes: int | None = Field(None, ge=1, description="memory cap for loaded models")
    model_load_cooldown: float = Field(300.0, ge=0, description="seconds before a failed load is retried")
    model_q4_threshold_bytes: int = Field(14_000_000_000, ge=0, description="weights above this use 4-bit under auto")
    max_concurrent_pulls: int = Field(2, ge=1, description="simultaneous downloads")
    pytorch_alloc_conf: str = Field("expandable_segments:True", description="CUDA allocator settings")
    data_dir: Path = Field(Path("~/.local/share/ai-server"), description="where the job database lives")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the job store")
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    keep_alive: float | None = Field(300.0, description="seconds an idle model stays loaded; None = forever")
    trust_remote_code_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where models run")
    max_batch_size: int = Field(16, ge=1, description="sequences one model decodes together (continuous batching)")
    max_queue: int = Field(64, ge=0, description="requests per model waiting for a batch slot; more get 503")
    # Per-model overrides of the parsers picked from the chat template (vLLM's names; "none" turns one off).
    tool_call_parsers: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    reasoning_parsers: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    pull_lease_seconds: float = Field(
        30.0, ge=0.5, description="a running pull's lease; a replica that stops renewing it loses the job"
    )
    job_retention: float | None = Field(
        30 * 86400.0, description="seconds finished pull jobs are kept (duration, e.g. '720h'); None = forever"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM model is split across")
    # vLLM without compilation (torch.compile, and CUDA graphs on a GPU). Unset: the engine's
    # default per device (runners/vllm.py says which and why).
    enforce_eager: bool | None = Field(None, description="vLLM runs uncompiled; unset: the device's default")
    # The transformers engine's torch threads on CPU. 0: one per core less one, which the serving
    # process's own threads (HTTP, tokenizing, streaming) keep: sharing every core with them stalls
    # each step's threads at their barriers (tokens/s at 8 streams on 2 cores: 1 thread 218, 2: 188).
    cpu_threads: int = Field(0, ge=0, description="torch threads of the transformers engine on CPU; 0: cores - 1")
    # LoRA adapters on vLLM (vLLM's own limits): adapters one batch holds, and the largest rank it
    # serves; an adapter beyond them (or one vLLM refuses) is served by PEFT on transformers.
    max_loras: int = Field(4, ge=1, description="LoRA adapters of one base in one vLLM batch")
    max_lora_rank: int = Field(64, description="largest LoRA rank vLLM serves (one of vLLM's sizes)")
    gpu_count: int | None = Field(
        None, ge=0, description="GPUs the service asks BentoCloud for (0: a CPU instance); default TENSOR_PARALLEL_SIZE"
    )
    gpu_type: str | None = Field(None, description="BentoCloud GPU type, e.g. nvidia-l4; None = any")
    max_request_bytes: int = Field(16 * 2**20, ge=1, description="largest request body; larger ones get 413")
    # Images in requests (vision models): limits that bound the memory a request can cost.
    max_image_bytes: int = Field(20_000_000, ge=1, description="encoded size of one image")
    max_image_pixels: int = Field(25_000_000, ge=1, description="width x height of one image (decompression bombs)")
    max_images_per_request: int = Field(16, ge=0, description="images in one request")
    # URL prefixes the server may fetch http(s) images from; empty: data URLs only (no SSRF).
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_fetch_timeout: float = Field(10.0, gt=0, description="seconds to fetch one allow-listed image")
    # How long stored OpenAI Responses (`store: true`) are kept for `previous_response_id` and GET.
    responses_retention: float = Field(30 * 86400.0, gt=0, description="seconds a stored response is kept")
    # Models (presets included) loaded at startup, in the background; readiness waits for them.
    preload_models: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("model_q4_threshold_bytes", "model_memory_budget_bytes", "max_request_bytes", mode="before")
    @classmethod
    def _bytes_allow_float_notation(cls, value: object) -> object:
        # "14e9" is how the original README writes the threshold.
        if isinstance(value, str) and value.strip():
            number = float(value)
            if not number.is_integer():
                raise ValueError("must be a whole number of bytes")
            return int(number)
        return None if value == "" else value

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_lora_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of vLLM's LoRA ranks {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive_duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("job_retention", mode="before")
    @classmethod
    def _retention_duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("responses_retention", mode="before")
    @classmethod
    def _responses_retention_duration(cls, value: object) -> float:
        seconds = parse_duration(value)
        if seconds is None:
            raise ValueError("must be a positive duration (e.g. '720h'): stored responses cannot be kept forever")
        return seconds

    @field_validator("trust_remote_code_models", "api_keys", "image_url_allowlist", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> list[str]:
        return _split_list(value)

    @field_validator("preload_models", mode="before")
    @classmethod
    def _model_names(cls, value: object) -> list[str]:
        from errors import InvalidModelName
        from runners.names import parse_model_name

        names = []
        for item in _split_list(value):
            try:
                names.append(parse_model_name(item).name)
            except InvalidModelName as exc:
                raise ValueError(exc.message) from None
        return names

    @field_validator("tool_call_parsers", "reasoning_parsers", mode="before")
    @classmethod
    def _mapping(cls, value: object) -> dict[str, str]:
        return _split_mapping(value)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'jobs.db'}"

    def public(self) -> dict[str, object]:
        """The configuration as `/status` shows it (no secrets)."""
        return {
            "max_cache_models": self.max_cache_models,
            "model_memory_budget_bytes": self.model_memory_budget_bytes,
            "cooldown_seconds": self.model_load_cooldown,
            "q4_threshold_bytes": self.model_q4_threshold_bytes,
            "max_concurrent_pulls": self.max_concurrent_pulls,
            "backend": self.backend,
            "device": self.device,
            "keep_alive_seconds": self.keep_alive,
            "trust_remote_code_models": self.trust_remote_code_models,
            "auth_enabled": bool(self.api_keys),
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "tool_call_parsers": self.tool_call_parsers,
            "reasoning_parsers": self.reasoning_parsers,
            "pull_lease_seconds": self.pull_lease_seconds,
            "job_retention_seconds": self.job_retention,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "cpu_threads": self.cpu_threads,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_request_bytes": self.max_request_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_images_per_request": self.max_images_per_request,
            "image_url_allowlist": self.image_url_allowlist,
            "responses_retention_seconds": self.responses_retention,
            "preload_models": self.preload_models,
        }


class SettingsError(RuntimeError):
    """Raised at startup when an environment variable holds an invalid value."""


def load_settings() -> Settings:
    """Read settings from the environment, turning validation errors into one clear message."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors())
        raise SettingsError(f"invalid configuration: {problems}") from None
    # Must be in the environment before torch initialises CUDA.
    os.environ.setdefault("PYTORCH_ALLOC_CONF", settings.pytorch_alloc_conf)
    return settings
