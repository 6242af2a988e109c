"""What a pulled model is, read from its files without loading it: family, size, context, template.

Ollama's /api/tags, /api/show and /api/ps describe models with these facts; reading safetensors
headers gives the exact parameter count in microseconds, whatever the model's size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from runners.local_cache import LocalModel

# Fill-in-the-middle token triples of the common code-model families (prefix, suffix, middle).
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


@dataclass(frozen=True)
class ModelInfo:
    family: str
    architecture: str
    parameter_count: int
    dtype: str
    quantization: str | None
    context_length: int | None
    config: dict = field(repr=False)
    chat_template: str | None = field(default=None, repr=False)
    fim_tokens: tuple[str, str, str] | None = None

    @property
    def parameter_size(self) -> str:
        """Ollama's human form: 7.2B, 494.0M, 330.5K."""
        n = self.parameter_count
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f}{unit}"
        return str(n)

    def capabilities(self, *, tools: bool, thinking: bool) -> list[str]:
        """Ollama's capability names, each only where true (tools and thinking: where the output
        parsers for them were found)."""
        caps = ["completion"]
        if tools:
            caps.append("tools")
        if thinking:
            caps.append("thinking")
        if self.fim_tokens:
            caps.append("insert")
        return caps


def describe(local: LocalModel) -> ModelInfo:
    return _describe(local.path, local.commit)


@lru_cache(maxsize=256)
def _describe(path: Path, commit: str) -> ModelInfo:  # commit: a new snapshot is a new cache entry
    config = json.loads((path / "config.json").read_text())
    text_config = config.get("text_config", config)
    quant = config.get("quantization_config")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelInfo(
        family=config.get("model_type", "unknown"),
        architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
        parameter_count=_parameter_count(path),
        dtype=dtype,
        quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        context_length=text_config.get("max_position_embeddings") or text_config.get("n_positions"),
        config=config,
        chat_template=_chat_template(path),
        fim_tokens=_fim_tokens(path),
    )


def _parameter_count(path: Path) -> int:
    """Sum of tensor sizes from safetensors headers (8-byte length, then a JSON header)."""
    total = 0
    for file in path.glob("*.safetensors"):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    if total == 0:  # .bin checkpoints have no cheap header: estimate from size and dtype
        size = sum(p.stat().st_size for p in path.glob("*.bin"))
        total = size // 4
    return total


def _chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list) and template:  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template}
            return named.get("default") or template[0].get("template")
    return None


def _fim_tokens(path: Path) -> tuple[str, str, str] | None:
    vocab: set[str] = set()
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text())
        vocab |= {t["content"] for t in data.get("added_tokens", [])}
        model_vocab = data.get("model", {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab |= {t for triple in FIM_TOKENS for t in triple if t in model_vocab}
    return next((triple for triple in FIM_TOKENS if all(t in vocab for t in triple)), None)
