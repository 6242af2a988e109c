"""The model pool: which models are loaded, and when they load and unload.

One unit owns every load decision (like Ollama's scheduler): resolve a name to a complete local
snapshot, load it once however many requests wait for it, evict least-recently-used models to stay
within MAX_CACHE_MODELS and MODEL_MEMORY_BUDGET_BYTES, unload idle models when their keep-alive
passes, and refuse to retry a failed load until MODEL_LOAD_COOLDOWN has passed.

Requests hold a lease while they run; a model evicted mid-request is unloaded when its last lease
is released, so no running generation loses its model.

Embeddings work on every model: a model whose generation runs on vLLM (whose generation engine
cannot embed) gets a second entry, a transformers runner of the same weights loaded for embeddings
only. It is an entry like any other (its own load, keep-alive and cooldown, its memory in the
budget, its place in the LRU), counted under its model's name for MAX_CACHE_MODELS: it is not
another model, and alternating chat and embeddings (retrieval) must not evict one for the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import metrics
from errors import ModelCoolingDown, ModelLoadFailed, ModelNotAllowed, ModelNotFound, ServerError
from runners.backend import BackendChoice, choose_backend, load_runner
from runners.base import Runner
from runners.local_cache import LocalModel, find_local
from runners.model_info import describe
from runners.names import ModelRef, parse_model_name
from runners.output_parsing import ParserChoice, choose_parsers
from runners.quantization import (
    Precision,
    QuantizeRequest,
    bf16_cpu_feature,
    bitsandbytes_available,
    checkpoint_dtype,
    decide_precision,
)
from settings import Settings

log = logging.getLogger(__name__)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
KeepAlive = float | None | _Default  # seconds; None = forever; DEFAULT = the KEEP_ALIVE setting
# "embed": a transformers runner that embeds for a model whose generation runner cannot.
Purpose = Literal["generate", "embed"]

_CHECKPOINT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_TARGET_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "nf4": 0.5}


@dataclass
class LoadedModel:
    name: str
    runner: Runner
    backend: BackendChoice
    load_duration_ns: int
    memory_bytes: int
    keep_alive: float | None
    parsers: ParserChoice  # how its output is split into answer, reasoning and tool calls
    purpose: Purpose = "generate"
    loaded_at: float = field(default_factory=time.time)
    loaded_at_ns: int = field(default_factory=time.perf_counter_ns)
    last_used: float = field(default_factory=time.time)
    expires_at: float | None = None
    active: int = 0
    retired: bool = False  # evicted while in use: unload when the last lease goes

    @property
    def key(self) -> str:
        """The pool's key: the model's name, or the embedding runner's key beside it."""
        return pool_key(self.name, self.purpose)


def pool_key(name: str, purpose: Purpose) -> str:
    return name if purpose == "generate" else f"{name}#embed"  # '#' is never part of a model name


@dataclass
class LoadFailure:
    at: float
    error: str


class Lease:
    """A request's hold on a loaded model; release it exactly once (further calls are no-ops)."""

    def __init__(self, pool: ModelPool, entry: LoadedModel, load_duration_ns: int) -> None:
        self._pool = pool
        self.entry = entry
        self.runner = entry.runner
        self.load_duration_ns = load_duration_ns  # this request's wait for a load; 0 if it was loaded
        self._released = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._pool._release(self.entry)


def resolve_device(setting: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise RuntimeError("DEVICE=cuda, but CUDA is not available to torch")
    return "cuda" if setting == "cuda" or (setting == "auto" and cuda) else "cpu"


class ModelPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._load_lock = asyncio.Lock()  # one load (and its evictions) at a time; requests never wait on it
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_expired(), name="model-pool-reaper")

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for name in list(self._loaded):
            await self._evict(name)

    # -- requests --------------------------------------------------------------------------
    async def acquire(
        self,
        name: str,
        *,
        quantize: QuantizeRequest = "auto",
        keep_alive: KeepAlive = DEFAULT,
        purpose: Purpose = "generate",
        files: str | None = None,
    ) -> Lease:
        """Lease a runner of the model `name` that can do `purpose`, loading it first if needed.
        `files`: the pulled model whose files load under `name` when `name` is not itself one (a
        preset with a precision of its own). Never downloads."""
        ref = parse_model_name(name)
        source = parse_model_name(files) if files is not None else ref
        started = time.perf_counter_ns()
        entry = self._loaded_for(ref.name, purpose)
        while entry is None or entry.retired:  # retired: evicted by another load before we got it
            entry = await self._load_shared(ref, quantize, purpose, source)
        load_ns = 0 if started > entry.loaded_at_ns else time.perf_counter_ns() - started
        self._loaded.move_to_end(entry.key)
        entry.active += 1
        entry.last_used = time.time()
        entry.expires_at = None
        if not isinstance(keep_alive, _Default):
            entry.keep_alive = keep_alive
        return Lease(self, entry, load_ns)

    async def unload(self, name: str) -> bool:
        """Unload a model (its embedding runner too) now, after its running requests finish.
        False if it was not loaded."""
        model = parse_model_name(name).name
        keys = [key for key in (pool_key(model, "generate"), pool_key(model, "embed")) if key in self._loaded]
        for key in keys:
            await self._evict(key)
        return bool(keys)

    def forget_failure(self, name: str) -> None:
        """A fresh pull may have fixed the model: allow an immediate retry."""
        model = parse_model_name(name).name
        for purpose in ("generate", "embed"):
            self._failures.pop(pool_key(model, purpose), None)

    # -- introspection ---------------------------------------------------------------------
    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def get_loaded(self, name: str) -> LoadedModel | None:
        """The model's generation runner, if loaded."""
        return self._loaded.get(parse_model_name(name).name)

    def _loaded_for(self, name: str, purpose: Purpose) -> LoadedModel | None:
        generation = self._loaded.get(name)
        if purpose == "generate" or (generation is not None and _engine_embeds(generation.backend)):
            return generation
        return self._loaded.get(pool_key(name, "embed"))

    def failed_loads(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        return {
            name: {"error": f.error, "retry_in_seconds": round(f.at + self.settings.model_load_cooldown - now, 1)}
            for name, f in self._failures.items()
            if f.at + self.settings.model_load_cooldown > now
        }

    def memory_in_use(self) -> int:
        return sum(e.memory_bytes for e in self._loaded.values())

    # -- loading ---------------------------------------------------------------------------
    async def _load_shared(
        self, ref: ModelRef, quantize: QuantizeRequest, purpose: Purpose, source: ModelRef
    ) -> LoadedModel:
        local = await asyncio.to_thread(find_local, source)  # reads the cache: off the event loop
        if local is None:
            raise ModelNotFound(
                f"model '{source.name}' is not pulled; pull it first (POST /pull or /api/pull with "
                f'{{"model": "{source.name}"}})',
                param="model",
            )
        if purpose == "embed":
            _, _, backend = await self._decide(local, quantize)
            if _engine_embeds(backend):
                purpose = "generate"  # its generation runner embeds too: one load serves both
        key = pool_key(ref.name, purpose)
        self._check_cooldown(key)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(ref.name, local, quantize, purpose), name=f"load:{key}")
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        # Shielded: a waiter that disconnects must not cancel the load the others wait for.
        return await asyncio.shield(task)

    def _check_cooldown(self, name: str) -> None:
        failure = self._failures.get(name)
        if failure is None:
            return
        now = time.monotonic()
        left = failure.at + self.settings.model_load_cooldown - now
        if left <= 0:
            del self._failures[name]
            return
        raise ModelCoolingDown(
            f"model '{name}' failed to load {now - failure.at:.0f}s ago ({failure.error}); "
            f"it will not be retried for another {left:.0f}s (MODEL_LOAD_COOLDOWN)",
            retry_after=left,
        )

    async def _decide(self, local: LocalModel, quantize: QuantizeRequest) -> tuple[bool, Precision, BackendChoice]:
        """Whether to trust the model's code, its precision, and the engine that generates with it."""
        config = local.config()
        trust = self._trust_remote_code(local, config)
        import torch

        precision = decide_precision(
            quantize,
            weight_bytes=local.weight_bytes,
            threshold_bytes=self.settings.model_q4_threshold_bytes,
            device=self.device,
            config=config,
            bnb_available=bitsandbytes_available(),
            bf16_supported=self.device == "cuda" and torch.cuda.is_bf16_supported(),
            cpu_bf16=bf16_cpu_feature() if self.device == "cpu" else None,
        )
        # In a thread: the first decision imports vLLM (seconds).
        backend = await asyncio.to_thread(
            choose_backend, self.settings.backend, device=self.device, config=config, precision=precision
        )
        return trust, precision, backend

    async def _load(self, name: str, local: LocalModel, quantize: QuantizeRequest, purpose: Purpose) -> LoadedModel:
        key = pool_key(name, purpose)
        async with self._load_lock:
            if key in self._loaded:  # loaded while this task waited for the lock
                return self._loaded[key]
            trust, precision, backend = await self._decide(local, quantize)
            if purpose == "embed":
                backend = BackendChoice(
                    "transformers",
                    f"embeddings: {backend.reason}, and vLLM's generation "
                    "engine cannot embed: a transformers runner of the same weights embeds",
                )
            estimate = _estimate_bytes(local, precision.mode, local.config())
            await self._evict_lru(
                lambda: self._model_count(name) > self.settings.max_cache_models or self._over_budget(estimate)
            )
            started = time.perf_counter_ns()
            try:
                runner = await asyncio.to_thread(
                    load_runner, backend, local, precision, self.device, trust, self.settings
                )
            except ServerError:
                raise
            except Exception as exc:
                self._failures[key] = LoadFailure(time.monotonic(), f"{type(exc).__name__}: {exc}")
                log.exception("loading %s failed", key)
                raise ModelLoadFailed(f"model '{name}' failed to load: {type(exc).__name__}: {exc}") from exc
            entry = LoadedModel(
                name=name,
                runner=runner,
                backend=backend,
                load_duration_ns=time.perf_counter_ns() - started,
                memory_bytes=runner.memory_bytes(),
                keep_alive=self.settings.keep_alive,
                parsers=choose_parsers(local.ref.repo_id, describe(local), self.settings),
                purpose=purpose,
            )
            log.info(
                "loaded %s on %s (%s, %s) in %.2fs",
                key,
                backend.name,
                self.device,
                precision.mode,
                entry.load_duration_ns / 1e9,
            )
            metrics.record_load(name, backend.name, entry.load_duration_ns / 1e9)
            self._loaded[key] = entry
            # The measured size may exceed the estimate: shed older models until we fit.
            await self._evict_lru(lambda: self._over_budget(0), keep=key)
            return entry

    def _model_count(self, adding: str) -> int:
        """Models loaded once `adding` is: a model's embedding runner is not another model."""
        return len({entry.name for entry in self._loaded.values()} | {adding})

    def _trust_remote_code(self, local: LocalModel, config: dict) -> bool:
        if not config.get("auto_map"):
            return False
        if local.ref.repo_id in self.settings.trust_remote_code_models:
            return True
        raise ModelNotAllowed(
            f"model '{local.ref.repo_id}' needs trust_remote_code (it ships its own code); "
            "add it to TRUST_REMOTE_CODE_MODELS to allow it"
        )

    def _over_budget(self, extra: int) -> bool:
        budget = self.settings.model_memory_budget_bytes
        return budget is not None and self.memory_in_use() + extra > budget

    # -- unloading -------------------------------------------------------------------------
    async def _evict_lru(self, needed: Callable[[], bool], keep: str | None = None) -> None:
        """Evict least-recently-used entries while `needed()` says room is still short."""
        while needed():
            victim = next((n for n in self._loaded if n != keep), None)
            if victim is None:
                return
            log.info("evicting %s (least recently used)", victim)
            await self._evict(victim)

    async def _evict(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is None:
            return
        entry.retired = True
        if entry.active == 0:
            await self._unload(entry)

    async def _unload(self, entry: LoadedModel) -> None:
        await asyncio.to_thread(entry.runner.unload)
        log.info("unloaded %s", entry.key)

    async def _release(self, entry: LoadedModel) -> None:
        entry.active -= 1
        entry.last_used = time.time()
        if entry.active > 0:
            return
        if entry.retired:
            await self._unload(entry)
        elif entry.keep_alive == 0:
            await self._evict(entry.key)
        elif entry.keep_alive is not None:
            entry.expires_at = entry.last_used + entry.keep_alive

    async def _reap_expired(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for entry in [e for e in self._loaded.values() if e.active == 0 and e.expires_at and e.expires_at <= now]:
                log.info("keep-alive of %s expired", entry.key)
                try:
                    await self._evict(entry.key)
                except Exception:  # one failed unload must not stop every later expiry
                    log.exception("unloading %s failed; it is no longer served", entry.key)


def _estimate_bytes(local: LocalModel, mode: str, config: dict) -> int:
    """Memory a load will take, from the checkpoint size and the target precision."""
    params = local.weight_bytes / _CHECKPOINT_BYTES.get(checkpoint_dtype(config), 4)
    return int(params * _TARGET_BYTES.get(mode, 0) or local.weight_bytes)


def _engine_embeds(backend: BackendChoice) -> bool:
    """vLLM's generation engine cannot embed; the transformers runner can."""
    return backend.name == "transformers"
