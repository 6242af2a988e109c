"""Tiny random-weight models for tests, built in seconds from nothing but local code.

Every builder writes a folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
accept (or, for `build_broken_model`, that looks complete and fails to load). The same seed gives the
same bytes, so a model's outputs are reproducible.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .repo_files import RepoEntry, commit_hash, scan_repo

if TYPE_CHECKING:  # transformers is imported lazily: importing this module stays cheap
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")  # fill-in-the-middle, as code models have
VOCAB_SIZE = 2000

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to a in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does another well large must "
    "big even such because turn here why ask went men read need land different home us move try kind hand "
    "picture again change off play spell air away animal house point page letter mother answer found study still "
    "learn should world hello model server token stream chat request response error json python prompt answer "
    "question load memory cache download weights tensor layer attention batch queue"
).split()
_SYLLABLES = ["ka", "ro", "mi", "te", "su", "la", "ne", "po", "ri", "da", "zu", "ve", "lo", "qui", "ba", "fen"]


def _corpus(lines: int = 6000, seed: int = 0) -> Iterator[str]:
    """Deterministic training text: English-ish sentences, invented words, numbers and code-like lines."""
    rng = random.Random(seed)
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words += ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(rng.randint(0, 3))]
        rng.shuffle(words)
        sentence = " ".join(words).capitalize() + rng.choice(".?!,;:")
        if i % 5 == 0:
            sentence += f' {{"id": {rng.randint(0, 99999)}, "{rng.choice(_WORDS)}": {rng.random():.3f}}}'
        if i % 7 == 0:
            sentence = f"def {rng.choice(_WORDS)}_{rng.choice(_WORDS)}(x):\n    return x * {rng.randint(2, 9)}\n"
        yield sentence


# A Qwen2.5/Qwen3-style template (Hermes tool calls in <tool_call> tags, <think> reasoning with an
# enable_thinking switch), in this tokenizer's role tokens. The markup is what real templates teach.
# A Qwen2.5/Qwen3-style template: ChatML turns, Hermes tool calls in <tool_call> tags, <think>
# reasoning with an enable_thinking switch. The markup is what the real templates teach.
HERMES_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n# Tools\\nYou may call functions. Signatures:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    '{{- \'\\n</tools>\\nReturn each call as <tool_call>\\n{"name": <name>, "arguments": <args>}\\n</tool_call>\''
    " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' -}}"
    "{{- (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
HERMES_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# A Llama-3.1-style JSON tool template: calls are a JSON object after <|python_tag|>, tool results
# come back in the ipython role.
LLAMA31_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    '{{- \'<|system|>\\nEnvironment: ipython\\nRespond with a JSON function call {"name": function name, '
    '"parameters": dictionary of arguments}. Functions:\' -}}'
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{{- '<|' + ('tool' if role == 'ipython' else role) + '|>\\n' -}}"
    "{%- if message.get('tool_calls') -%}"
    "{%- for call in message['tool_calls'] -%}{%- set fn = call['function'] -%}"
    "{{- '<|python_tag|>{\"name\": \"' + fn['name'] + '\", \"parameters\": ' -}}"
    "{{- (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson) + '}' -}}"
    "{%- endfor -%}"
    "{%- elif message['content'] is string -%}{{- message['content'] -}}{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
LLAMA31_TOKENS = ("<|python_tag|>",)


def build_tokenizer(
    dst: Path, chat_template: bool | str, fill_in_middle: bool = True, extra_tokens: tuple[str, ...] = ()
) -> None:
    """Train a byte-level BPE tokenizer (~2k tokens) and save it as a `PreTrainedTokenizerFast` in `dst`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS, *(FIM_TOKENS if fill_in_middle else ())],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    if extra_tokens:  # markup tokens that stay in decoded text (not special), as in Qwen's vocabulary
        from tokenizers import AddedToken

        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    template = chat_template if isinstance(chat_template, str) else CHAT_TEMPLATE if chat_template else None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[*ROLE_TOKENS, *(FIM_TOKENS if fill_in_middle else ())],
        chat_template=template,
        model_max_length=512,
    )
    tokenizer.save_pretrained(dst)


def _load_tokenizer(dst: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dst)


def _save_seeded(
    dst: Path, config: PreTrainedConfig, model_class: type[PreTrainedModel], seed: int, dtype: str | None = None
) -> None:
    """Instantiate `model_class(config)` under a private seeded RNG and save it (safetensors + generation config),
    in `dtype` (e.g. "bfloat16", as most Hub checkpoints are) or float32."""
    import torch
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(dst, safe_serialization=True)


def build_tiny_llama(
    dst: Path,
    *,
    seed: int = 0,
    chat_template: bool | str = True,
    hidden_size: int = 64,
    layers: int = 2,
    context: int = 512,
    intermediate_size: int = 128,
    heads: int = 4,
    extra_tokens: tuple[str, ...] = (),
    dtype: str | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """A random-weight `LlamaForCausalLM` with its own tokenizer in `dst`, saved in `dtype` (float32 when
    None); returns `dst`. `chat_template` may be a template of its own (e.g. HERMES_TEMPLATE with
    HERMES_TOKENS); `tie_embeddings` ties the output head to the embeddings (as Qwen2.5-0.5B and
    Llama 3.2 1B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(dst, chat_template, extra_tokens=extra_tokens)
    tok = _load_tokenizer(dst)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    _save_seeded(dst, config, LlamaForCausalLM, seed, dtype)
    return dst


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_adapter(base_dir: Path, dst: Path, *, seed: int, base_name: str, rank: int = 8) -> Path:
    """A PEFT LoRA adapter of the model in `base_dir` with random A and B (PEFT's default B is zero,
    which would change nothing), naming `base_name` (a repo id) as its base, as adapters on the Hub
    do; returns `dst`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(dst)
    config_file = dst / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": base_name}))
    return dst


def build_tiny_gpt2(dst: Path, seed: int = 0) -> Path:
    """A random-weight `GPT2LMHeadModel` whose tokenizer has no chat template and no FIM tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    build_tokenizer(dst, chat_template=False, fill_in_middle=False)
    tok = _load_tokenizer(dst)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    _save_seeded(dst, config, GPT2LMHeadModel, seed)
    return dst


def build_broken_model(dst: Path) -> Path:
    """A tiny llama whose `model.safetensors` is truncated: every file is there, loading fails."""
    build_tiny_llama(dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


# CHAT_TEMPLATE with image parts: each `{"type": "image"}` part becomes an <image> placeholder,
# which the processor expands into the image's tokens (as LLaVA's own templates do).
IMAGE_TOKEN = "<image>"
VISION_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}",
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}",
)


def build_tiny_llava(dst: Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A random-weight `LlavaForConditionalGeneration` (a tiny CLIP vision tower and a tiny Llama)
    saved with its `LlavaProcessor` (CLIP's PIL image processor: no torchvision needed) in `dst`.

    Every image is resized and cropped to `image_size` square and becomes
    (image_size / patch_size)² tokens: 16 with the defaults."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    assert VISION_CHAT_TEMPLATE != CHAT_TEMPLATE
    build_tokenizer(dst, VISION_CHAT_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        image_token=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VISION_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    processor.save_pretrained(dst)  # the tokenizer (with <image>), processor_config.json, chat_template.jinja
    _save_seeded(dst, config, LlavaForConditionalGeneration, seed)
    return dst


_REMOTE_CODE = {
    "configuration_custom.py": '''"""Custom config for a test model: loading it needs trust_remote_code=True."""

from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    """LlamaConfig under a model type transformers does not know."""

    model_type = "custom_llama"
''',
    "modeling_custom.py": '''"""Custom model for a test model: loading it needs trust_remote_code=True."""

from transformers import LlamaForCausalLM

from .configuration_custom import CustomLlamaConfig


class CustomLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM under another name."""

    config_class = CustomLlamaConfig
''',
}


def build_remote_code_model(dst: Path) -> Path:
    """A tiny llama of an unknown `model_type` whose config maps the Auto classes to code in the repo.

    transformers refuses it unless `trust_remote_code=True` (then it runs `modeling_custom.py`).
    """
    build_tiny_llama(dst)
    for name, code in _REMOTE_CODE.items():
        (dst / name).write_text(code)
    config_file = dst / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "custom_llama"
    config["architectures"] = ["CustomLlamaForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomLlamaConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM",
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by huggingface_hub.\n"
    "# For information about cache directory tags, see:\n"
    "#\thttps://bford.info/cachedir/\n"
)


def install_into_hf_cache(src: Path, hub_cache: Path, repo_id: str, revision: str = "main") -> Path:
    """Copy a model folder into a Hugging Face hub cache as if downloaded; returns the snapshot folder.

    Layout written, as huggingface_hub 2.x writes it: `models--org--name/blobs/<etag>`,
    `snapshots/<commit>/<file>` (relative symlinks to the blobs), `refs/<revision>` (the commit) and the
    tree listing `trees/<commit>.json` that lets `local_files_only=True` check the snapshot is complete.
    The commit is the one `LocalHub` reports for the same content.
    """
    entries = scan_repo(src)
    commit = commit_hash(entries)
    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for entry in entries:
        blob = storage / "blobs" / entry.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(entry.file, blob)
        pointer = snapshot / entry.path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    _write_tree_listing(storage / "trees" / f"{commit}.json", entries)
    tag = hub_cache / "CACHEDIR.TAG"
    if not tag.exists():
        tag.write_text(_CACHEDIR_TAG)
    return snapshot


def _write_tree_listing(path: Path, entries: list[RepoEntry]) -> None:
    """huggingface_hub's `trees/<commit>.json` (format 1): what a complete snapshot holds."""
    files = {}
    for e in entries:
        info = {"size": e.size, "blob_id": e.git_oid}
        if e.sha256:
            info |= {"lfs_sha256": e.sha256, "lfs_size": e.size}
        files[e.path] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format_version": 1, "files": files}, indent=1))
