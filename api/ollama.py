"""The Ollama API (`/api/*`, NDJSON streaming), so Ollama clients, Open WebUI and LangChain work
unchanged. Formats follow Ollama's docs/api.md; generation goes through the shared path."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from api import ollama_response_models as response_models
from api.deps import get_runtime
from api.errors import stream_error
from api.ollama_schemas import (
    ChatRequest,
    CopyRequest,
    CreateRequest,
    EmbedRequest,
    GenerateRequest,
    LegacyEmbeddingsRequest,
    NamedModel,
    thinking_switches,
)
from api.openapi_docs import answers, errors
from api.presets import build_preset, creation_statuses, digest, renamed, show_fields, tagged
from api.streaming import NDJSON_MEDIA_TYPE, started_stream, stream_generation
from api.strict_json import StrictJSONRoute
from errors import InvalidRequest, ModelNotFound, ServerError
from jobs.models import UNFINISHED, PullJob, iso_utc
from jobs.presets import Preset
from runners.adapters import base_not_pulled, described_by
from runners.base import GenerationRequest, OutputDelta, ToolCall, ToolCallDelta
from runners.embedding import embed
from runners.generation import Completion, Generation, GenerationStats, start_generation
from runners.images import image_part
from runners.local_cache import LocalModel, copy_model, delete_model, find_local, list_local
from runners.model_info import ModelInfo, describe
from runners.names import parse_model_name
from runners.output_parsing import choose_parsers, merge_tool_calls
from runners.pool import KeepAlive
from runners.presets import resolve
from runners.records import ModelSnapshot, Purpose
from runtime import Runtime

router = APIRouter(tags=["ollama"], route_class=StrictJSONRoute, responses=errors(response_models.OllamaErrorResponse))

# The Ollama API level this dialect follows; clients gate features on it.
OLLAMA_API_VERSION = "0.12.6"
_FOREVER = datetime(2318, 1, 1, tzinfo=timezone.utc)  # what Ollama reports for "never expires"
_PULL_POLL_SECONDS = 0.2


def final_stats(stats: GenerationStats) -> dict[str, Any]:
    """The statistics a final Ollama answer carries (durations in ns, counts in tokens)."""
    return {
        "done_reason": stats.finish_reason,
        "total_duration": stats.total_duration_ns,
        "load_duration": stats.load_duration_ns,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": stats.prompt_eval_duration_ns,
        "eval_count": stats.completion_tokens,
        "eval_duration": stats.eval_duration_ns,
    }


def _now() -> str:
    return iso_utc(datetime.now(timezone.utc))


async def _local_or_404(name: str) -> LocalModel:
    """The complete local snapshot of `name`; it reads the cache, so in a thread, off the event loop."""
    local = await asyncio.to_thread(find_local, parse_model_name(name))
    if local is None:
        raise ModelNotFound(f"model '{name}' not found, try pulling it first", param="model")
    return local


# -- generation ----------------------------------------------------------------------------------


@router.post("/api/chat", responses=answers(response_models.OllamaChatResponse, stream=NDJSON_MEDIA_TYPE))
async def chat(body: ChatRequest, runtime: Runtime = Depends(get_runtime)) -> Response:
    keep_alive = body.keep_alive_seconds()
    if not body.messages:
        return await _load_or_unload(runtime, body.model, keep_alive, {"message": _assistant("")})
    request = GenerationRequest(
        messages=[m.for_template(i) for i, m in enumerate(body.messages)],
        options=body.options.sampling(),
        response_format=body.response_format(),
        tools=body.tool_list(),
        tool_choice=body.tool_choice_value(),
        template_kwargs=thinking_switches(body.think),
        require_thinking=bool(body.think),
        fit_context=True,
        context_limit=body.options.num_ctx,
    )
    generation = await start_generation(
        runtime.pool, body.model, request, keep_alive=keep_alive, presets=runtime.presets
    )
    return await _respond(body.model, generation, body.stream, ChatPieces(body.think is not False))


@router.post("/api/generate", responses=answers(response_models.OllamaGenerateResponse, stream=NDJSON_MEDIA_TYPE))
async def generate(body: GenerateRequest, runtime: Runtime = Depends(get_runtime)) -> Response:
    if body.images and (body.raw or body.suffix is not None):
        raise InvalidRequest(
            "images need the model's chat template: they cannot go with `raw` or `suffix`", param="images"
        )
    keep_alive = body.keep_alive_seconds()
    if not body.prompt and not body.images and body.suffix is None:
        return await _load_or_unload(runtime, body.model, keep_alive, {"response": ""})
    request = GenerationRequest(
        options=body.options.sampling(), response_format=body.response_format(), context_limit=body.options.num_ctx
    )
    if body.raw or body.suffix is not None:
        request.prompt, request.suffix = body.prompt, body.suffix
    else:
        # The chat template when the model has one; the text itself for base models, as Ollama does.
        system = [{"role": "system", "content": body.system}] if body.system else []
        images = [image_part(data, f"images[{i}]") for i, data in enumerate(body.images or [])]
        user = [*images, {"type": "text", "text": body.prompt}] if images else body.prompt
        request.messages = [*system, {"role": "user", "content": user}]
        request.prompt = f"{body.system}\n\n{body.prompt}" if body.system else body.prompt
        request.template_kwargs = thinking_switches(body.think)
        request.require_thinking = bool(body.think)
    generation = await start_generation(
        runtime.pool, body.model, request, keep_alive=keep_alive, presets=runtime.presets
    )
    return await _respond(body.model, generation, body.stream, _GeneratePieces(body.think is not False))


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def tool_call_json(call: ToolCall, index: int) -> dict[str, Any]:
    """Ollama's tool call: arguments as an object."""
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": call.arguments_object()}}


class ChatPieces:
    """/api/chat's fields: `message` with content, thinking and tool calls. Ollama sends each tool
    call whole in one chunk, so streamed call pieces are held until the call is complete."""

    def __init__(self, show_thinking: bool) -> None:
        self._show_thinking = show_thinking
        self._pending: list[ToolCallDelta] = []  # pieces of calls not sent yet
        self._sent = 0  # calls sent so far

    def final(self, done: Completion) -> dict[str, Any]:
        message: dict[str, Any] = _assistant(done.text)
        if done.reasoning and self._show_thinking:
            message["thinking"] = done.reasoning
        if done.tool_calls:
            message["tool_calls"] = [tool_call_json(call, i) for i, call in enumerate(done.tool_calls)]
        return {"message": message}

    def piece(self, delta: OutputDelta) -> dict[str, Any] | None:
        self._pending += delta.tool_calls
        calls = self._complete_calls(finished=delta.finish_reason is not None)
        thinking = delta.reasoning if self._show_thinking else ""
        if not (delta.content or thinking or calls):
            return None
        message: dict[str, Any] = _assistant(delta.content)
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return {"message": message}

    def _complete_calls(self, finished: bool) -> list[dict[str, Any]]:
        """Calls whose pieces are all here: every call but the last one streaming, or all at the end."""
        if not self._pending:
            return []
        last = max(d.index for d in self._pending)
        ready = [d for d in self._pending if finished or d.index < last]
        self._pending = [d for d in self._pending if d not in ready]
        calls = merge_tool_calls(ready)
        out = [tool_call_json(call, self._sent + i) for i, call in enumerate(calls)]
        self._sent += len(calls)
        return out

    def empty(self) -> dict[str, Any]:
        return {"message": _assistant("")}


class _GeneratePieces:
    """/api/generate's fields: `response` and `thinking`."""

    def __init__(self, show_thinking: bool) -> None:
        self._show_thinking = show_thinking

    def final(self, done: Completion) -> dict[str, Any]:
        out: dict[str, Any] = {"response": done.text}
        if done.reasoning and self._show_thinking:
            out["thinking"] = done.reasoning
        return out

    def piece(self, delta: OutputDelta) -> dict[str, Any] | None:
        thinking = delta.reasoning if self._show_thinking else ""
        if not (delta.content or thinking):
            return None
        return {"response": delta.content, **({"thinking": thinking} if thinking else {})}

    def empty(self) -> dict[str, Any]:
        return {"response": ""}


async def _respond(model: str, generation: Generation, stream: bool, pieces: ChatPieces | _GeneratePieces) -> Response:
    if not stream:
        done = await generation.collect()
        return JSONResponse(
            {"model": model, "created_at": _now(), **pieces.final(done), "done": True, **final_stats(done.stats)}
        )
    deltas = await started_stream(generation.stream())

    async def lines() -> AsyncIterator[str]:
        try:
            async for delta in deltas:
                fields = pieces.piece(delta)
                if fields is not None:
                    yield _line({"model": model, "created_at": _now(), **fields, "done": False})
        except Exception as exc:  # the status is sent: Ollama reports late errors as a last line
            yield stream_error(exc, "ollama")
            return
        assert generation.stats is not None
        yield _line(
            {"model": model, "created_at": _now(), **pieces.empty(), "done": True, **final_stats(generation.stats)}
        )

    return stream_generation(generation, lines(), NDJSON_MEDIA_TYPE)


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload) + "\n"


async def _load_or_unload(
    runtime: Runtime, model: str, keep_alive: KeepAlive, empty: dict, purpose: Purpose = "generate"
) -> JSONResponse:
    """Ollama's convention: no prompt loads the model; no prompt with keep_alive 0 unloads it."""
    served = await resolve(runtime.presets, model)
    await _local_or_404(served.files or served.name)
    if keep_alive == 0:
        await runtime.pool.unload(served.name)
        reason = "unload"
    else:
        lease = await runtime.pool.acquire(
            served.name, quantize=served.quantize, keep_alive=keep_alive, purpose=purpose, files=served.files
        )
        await lease.release()
        reason = "load"
    return JSONResponse({"model": model, "created_at": _now(), **empty, "done": True, "done_reason": reason})


# -- embeddings ----------------------------------------------------------------------------------


@router.post("/api/embed", responses=answers(response_models.OllamaEmbedResponse))
async def embed_texts(body: EmbedRequest, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await embed(
        runtime.pool,
        body.model,
        texts,
        truncate=body.truncate,
        keep_alive=body.keep_alive_seconds(),
        presets=runtime.presets,
    )
    vectors = result.vectors
    if body.dimensions:
        vectors = [_renormalized(v[: body.dimensions]) for v in vectors]
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": result.total_duration_ns,
        "load_duration": result.load_duration_ns,
        "prompt_eval_count": result.prompt_tokens,
    }


@router.post("/api/embeddings", responses=answers(response_models.OllamaEmbeddingsResponse))
async def legacy_embeddings(body: LegacyEmbeddingsRequest, runtime: Runtime = Depends(get_runtime)) -> dict:
    if not body.prompt:
        await _load_or_unload(runtime, body.model, body.keep_alive_seconds(), {}, purpose="embed")
        return {"embedding": []}
    result = await embed(
        runtime.pool,
        body.model,
        [body.prompt],
        truncate=True,
        keep_alive=body.keep_alive_seconds(),
        presets=runtime.presets,
    )
    return {"embedding": result.vectors[0]}


def _renormalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


# -- models --------------------------------------------------------------------------------------


def _details(info: ModelInfo) -> dict[str, Any]:
    level = info.quantization or {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(info.dtype, info.dtype)
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": info.family,
        "families": [info.family],
        "parameter_size": info.parameter_size,
        "quantization_level": level.upper(),
    }


def _model_entry(local: LocalModel) -> dict[str, Any]:
    """A model's (or a LoRA adapter's) entry in /api/tags; an adapter's details are its base's,
    with the base as `parent_model`."""
    source, parent = described_by(local)
    details = _details(describe(source)) if source is not None else dict(_UNKNOWN_DETAILS)
    details["parent_model"] = parent
    return {
        "name": local.ref.tagged_name,
        "model": local.ref.tagged_name,
        "modified_at": iso_utc(datetime.fromtimestamp(local.modified_at, timezone.utc)),
        "size": local.size_bytes,
        "digest": local.commit,
        "details": details,
    }


# An adapter whose base is not pulled: nothing describes it until the base is.
_UNKNOWN_DETAILS = {
    "format": "safetensors",
    "family": "",
    "families": [],
    "parameter_size": "",
    "quantization_level": "",
}


def _preset_entry(preset: Preset) -> dict[str, Any]:
    """A preset as /api/tags lists it: its base model's size and details, its own name and digest."""
    base = find_local(parse_model_name(preset.base))
    entry: dict[str, Any] = _model_entry(base) if base is not None else {"size": 0, "details": dict(_UNKNOWN_DETAILS)}
    entry["details"]["parent_model"] = tagged(preset.base)
    return {
        **entry,
        "name": tagged(preset.name),
        "model": tagged(preset.name),
        "modified_at": iso_utc(preset.modified_at),
        "digest": digest(preset),
    }


def _all_models(runtime: Runtime) -> list[dict[str, Any]]:
    return [_model_entry(m) for m in list_local()] + [_preset_entry(p) for p in runtime.presets.list()]


@router.get("/api/tags", responses=answers(response_models.OllamaTagsResponse))
async def tags(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    # `replica`: not Ollama's; says which replica answered when several share a model cache.
    return {"models": await asyncio.to_thread(_all_models, runtime), "replica": runtime.jobs.owner}


@router.post("/api/show", responses=answers(response_models.OllamaShowResponse))
async def show(body: NamedModel, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    preset = (await resolve(runtime.presets, body.model)).preset
    local = await _local_or_404(preset.base if preset else body.model)
    source, parent = await asyncio.to_thread(described_by, local)
    if source is None:
        raise (
            base_not_pulled(local.ref.name, parse_model_name(parent))
            if parent
            else ModelNotFound(f"'{local.ref.name}' is an adapter this server cannot serve", param="model")
        )
    info = await asyncio.to_thread(describe, source)
    parsers = choose_parsers(source.ref.repo_id, info, runtime.settings)
    generation_config = source.path / "generation_config.json"
    params = json.loads(generation_config.read_text()) if generation_config.is_file() else {}
    parameters = "\n".join(
        f"{k:<30} {v}"
        for k, v in params.items()
        if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    )
    # A LoRA adapter reads as Ollama writes one: its base, then the adapter.
    modelfile = f"FROM {parent}\nADAPTER {local.ref.tagged_name}\n" if parent else f"FROM {local.ref.tagged_name}\n"
    shown: dict[str, Any] = {
        "modelfile": f"# Served by ai-server from the Hugging Face cache\n{modelfile}",
        "parameters": parameters,
        "template": info.chat_template or "",
        "details": {**_details(info), "parent_model": parent},
        "model_info": _model_info(info, local),
        "capabilities": info.capabilities(tools=parsers.tools, thinking=parsers.thinking),
        "modified_at": iso_utc(datetime.fromtimestamp(local.modified_at, timezone.utc)),
    }
    if preset is not None:
        shown.update(show_fields(preset), modified_at=iso_utc(preset.modified_at))
        shown["details"]["parent_model"] = local.ref.tagged_name
    return shown


def _model_info(info: ModelInfo, local: LocalModel) -> dict[str, Any]:
    """Ollama's GGUF-style keys, filled from the Hugging Face config."""
    config, arch = info.config.get("text_config", info.config), info.family
    keys = {
        "context_length": info.context_length,
        "embedding_length": config.get("hidden_size"),
        "block_count": config.get("num_hidden_layers"),
        "feed_forward_length": config.get("intermediate_size"),
        "attention.head_count": config.get("num_attention_heads"),
        "attention.head_count_kv": config.get("num_key_value_heads"),
        "vocab_size": config.get("vocab_size"),
    }
    return {
        "general.architecture": arch,
        "general.basename": local.ref.repo_id,
        "general.parameter_count": info.parameter_count,
        **{f"{arch}.{k}": v for k, v in keys.items() if v is not None},
    }


@router.get("/api/ps", responses=answers(response_models.OllamaPsResponse))
async def running(runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    running = []
    for entry in runtime.pool.snapshot():
        running.append(_running_entry(entry))
        # LoRA adapters attached to it: served by its runner, their base as parent_model.
        running.extend(_running_entry(entry, adapter) for adapter in entry.adapters)
    return {"models": running, "replica": runtime.jobs.owner}


def _running_entry(entry: ModelSnapshot, adapter: LocalModel | None = None) -> dict[str, Any]:
    """A loaded model in /api/ps, or (`adapter`) a LoRA adapter attached to it."""
    local = entry.local
    if entry.expires_at is not None:
        expires = datetime.fromtimestamp(entry.expires_at, timezone.utc)
    elif entry.keep_alive is None:
        expires = _FOREVER
    else:  # in use: it expires keep_alive after the running requests end, at the earliest
        expires = datetime.fromtimestamp(entry.last_used + entry.keep_alive, timezone.utc)
    info = describe(local)
    entry_json = _model_entry(adapter or local)
    if adapter is None:
        entry_json["name"] = entry_json["model"] = tagged(entry.name)  # a preset loaded on its own: its name
    entry_json["details"]["quantization_level"] = entry.precision.upper()  # as loaded
    size = adapter.size_bytes if adapter else entry.memory_bytes  # an adapter: its own weights
    return {
        **entry_json,
        "size": size,
        "expires_at": iso_utc(expires),
        "size_vram": size if entry.device == "cuda" else 0,
        "context_length": info.context_length,
    }


@router.delete("/api/delete")
async def delete(body: NamedModel, runtime: Runtime = Depends(get_runtime)) -> Response:
    name = parse_model_name(body.model).name
    if await asyncio.to_thread(runtime.presets.delete, name):  # a preset: its row only, never its base's files
        await runtime.pool.unload(name)  # loaded under its own name only when it has its own precision
        return Response(status_code=200)
    local = await _local_or_404(body.model)
    await runtime.pool.unload(local.ref.name)
    await asyncio.to_thread(delete_model, local.ref)
    return Response(status_code=200)


@router.post("/api/copy")
async def copy(body: CopyRequest, runtime: Runtime = Depends(get_runtime)) -> Response:
    destination = parse_model_name(body.destination)
    preset = (await resolve(runtime.presets, body.source)).preset
    if preset is not None:
        if await asyncio.to_thread(find_local, destination) is not None:
            raise InvalidRequest(f"'{destination.name}' is a pulled model: copy to another name", param="destination")
        await asyncio.to_thread(runtime.presets.put, renamed(preset, destination))
        return Response(status_code=200)
    source = await _local_or_404(body.source)
    await asyncio.to_thread(copy_model, source, destination)
    await asyncio.to_thread(runtime.presets.delete, destination.name)  # a copy replaces a preset of that name
    return Response(status_code=200)


@router.post("/api/create")
async def create(body: CreateRequest, runtime: Runtime = Depends(get_runtime)) -> Response:
    """Ollama's create, as a preset over a pulled model. Every check runs before the answer starts,
    so a bad request gets its status code (as Ollama's errors before the first line do)."""
    preset = await build_preset(runtime, body)
    await asyncio.to_thread(runtime.presets.put, preset)
    statuses = creation_statuses(preset)
    if not body.stream:
        return JSONResponse(statuses[-1])
    return StreamingResponse(iter([_line(s) for s in statuses]), media_type=NDJSON_MEDIA_TYPE)


# -- pull ----------------------------------------------------------------------------------------


@router.post("/api/pull", responses=answers(response_models.OllamaProgressResponse, stream=NDJSON_MEDIA_TYPE))
async def pull(body: NamedModel, runtime: Runtime = Depends(get_runtime)) -> Response:
    ref = parse_model_name(body.model)
    job = await runtime.jobs.submit(ref, "auto", False)
    if not body.stream:
        job = await _finished(runtime, job)
        if job.status != "succeeded":
            error = job.error or f"pull {job.status}"
            return JSONResponse({"error": error}, status_code=_pull_failure_status(error))
        return JSONResponse({"status": "success"})

    async def progress() -> AsyncIterator[str]:
        yield _line({"status": "pulling manifest"})
        last: tuple[int, int | None] | None = None
        current = job
        try:
            async for current in _job_states(runtime, job):
                if current.total_bytes and (current.completed_bytes, current.total_bytes) != last:
                    last = (current.completed_bytes, current.total_bytes)
                    yield _line(
                        {
                            "status": f"pulling {ref.name}",
                            "digest": ref.name,
                            "total": current.total_bytes,
                            "completed": current.completed_bytes,
                        }
                    )
        except ServerError as exc:
            yield stream_error(exc, "ollama")
            return
        if current.status == "succeeded":
            yield _line({"status": "success"})
        else:
            yield _line({"error": current.error or f"pull {current.status}"})

    return StreamingResponse(progress(), media_type=NDJSON_MEDIA_TYPE)


async def _job_states(runtime: Runtime, job: PullJob) -> AsyncIterator[PullJob]:
    """The job's row, read again every poll interval until it has finished. Whichever replica claimed
    the job runs it, so its row in the shared database is the one thing there is to watch."""
    while True:
        current = await runtime.jobs.get(job.id)
        if current is None:  # removed meanwhile (finished and purged by a zero retention)
            raise ServerError(f"pull job {job.id} disappeared before it finished")
        yield current
        if current.status not in UNFINISHED:
            return
        await asyncio.sleep(_PULL_POLL_SECONDS)


async def _finished(runtime: Runtime, job: PullJob) -> PullJob:
    async for state in _job_states(runtime, job):
        job = state
    return job


def _pull_failure_status(error: str) -> int:
    """Ollama answers a failed pull with the registry's reason and, lacking a status, 500
    (server/routes.go, waitForStream). A model that does not exist or may not be read is the
    client's to fix, so those are 404 and 403 here; the Hub unreachable or a full disk stay 5xx."""
    if "was not found" in error or "which is not pulled" in error:  # a repo, a revision, an adapter's base
        return 404
    if "not authorized" in error or "gated model" in error:
        return 403
    hub = re.search(r"answered HTTP (4\d\d)", error)  # any other refusal of the Hub's, passed on
    return int(hub.group(1)) if hub else 500


# -- server --------------------------------------------------------------------------------------


@router.get("/api/version", responses=answers(response_models.OllamaVersionResponse))
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")
