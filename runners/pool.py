"""The model pool: which models are loaded, and when they load and unload.

One unit owns every load decision (like Ollama's scheduler): resolve a name to a complete local
snapshot, load it once however many requests wait for it, evict least-recently-used models to stay
within MAX_CACHE_MODELS and MODEL_MEMORY_BUDGET_BYTES, unload idle models when their keep-alive
passes, and refuse to retry a failed load until MODEL_LOAD_COOLDOWN has passed.

Requests hold a lease while they run; a model evicted mid-request is unloaded when its last lease
is released, so no running generation loses its model. The lease is also where every request is
admitted, whichever engine runs it and whether it generates or embeds: a model holds at most
MAX_BATCH_SIZE + MAX_QUEUE leases, and a request beyond that gets ServerBusy (503, Retry-After),
as Ollama's scheduler refuses with ErrMaxQueue. The engines have no admission of their own.

Readers (the API, metrics) get `snapshot()`: frozen records of the loaded models, never the
runners. The mechanics of a load (finding the snapshot, the precision and engine, the runner) are
a `ModelLoader`'s (runners/loader.py), so the policy here can be tested with a fake one.

Embeddings work on every model: a model whose generation runs on vLLM (whose generation engine
cannot embed) gets a second entry, a transformers runner of the same weights loaded for embeddings
only. It is an entry like any other (its own load, keep-alive and cooldown, its memory in the
budget, its place in the LRU), counted under its model's name for MAX_CACHE_MODELS: it is not
another model, and alternating chat and embeddings (retrieval) must not evict one for the other.

A LoRA adapter is no entry of its own: its requests lease its base's entry, with the adapter
attached to the base's runner (runners/adapters.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import metrics
from errors import InvalidRequest, ModelCoolingDown, ModelLoadFailed, ModelNotFound, ServerBusy, ServerError
from runners.adapters import AdapterRunner, AdapterServing, base_snapshot
from runners.backend import BackendChoice
from runners.base import Adapter, AdapterRefused, Runner
from runners.loader import EngineLoader, LoadPlan, ModelLoader
from runners.local_cache import LocalModel
from runners.names import ModelRef, parse_model_name
from runners.output_parsing import ParserChoice
from runners.quantization import QuantizeRequest
from runners.records import ModelSnapshot, Purpose
from settings import Settings

log = logging.getLogger(__name__)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
KeepAlive = float | None | _Default  # seconds; None = forever; DEFAULT = the KEEP_ALIVE setting
__all__ = ["DEFAULT", "KeepAlive", "Lease", "ModelPool", "Purpose"]


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

    def snapshot(self) -> ModelSnapshot:
        runner = self.runner
        return ModelSnapshot(
            name=self.name,
            purpose=self.purpose,
            local=runner.model,
            backend=self.backend.name,
            backend_reason=self.backend.reason,
            precision=runner.precision.mode,
            precision_reason=runner.precision.reason,
            device=runner.device,
            context_length=runner.context_length,
            parsers=self.parsers,
            memory_bytes=self.memory_bytes,
            load_duration_ns=self.load_duration_ns,
            leases=self.active,
            running=runner.batch_size(),
            waiting=runner.queue_depth(),
            keep_alive=self.keep_alive,
            last_used=self.last_used,
            expires_at=self.expires_at,
            adapters=tuple(adapter.local for _, adapter in sorted(runner.adapters.items())),
        )


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

    def snapshot(self) -> ModelSnapshot:
        """The leased model as readers see it (no runner attributes)."""
        return self.entry.snapshot()

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._pool._release(self.entry)


class ModelPool:
    def __init__(self, settings: Settings, loader: ModelLoader | None = None) -> None:
        self.settings = settings
        self.loader: ModelLoader = loader or EngineLoader(settings)
        self.device = self.loader.device
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._load_lock = asyncio.Lock()  # one load (and its evictions) at a time; requests never wait on it
        self._reaper: asyncio.Task[None] | None = None
        self.adapters = AdapterServing(settings)

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
        if entry is None and (adapter := await self.adapters.find(ref)) is not None:
            if purpose != "generate":
                raise InvalidRequest(f"'{ref.name}' is a LoRA adapter: embed with its base '{adapter.base.name}'")
            return await self._lease_adapter(adapter, quantize=quantize, keep_alive=keep_alive)
        while entry is None or entry.retired:  # retired: evicted by another load before we got it
            entry = await self._load_shared(ref, quantize, purpose, source)
        self._admit(entry)
        load_ns = 0 if started > entry.loaded_at_ns else time.perf_counter_ns() - started
        self._loaded.move_to_end(entry.key)
        entry.active += 1
        entry.last_used = time.time()
        entry.expires_at = None
        if not isinstance(keep_alive, _Default):
            entry.keep_alive = keep_alive
        return Lease(self, entry, load_ns)

    def _admit(self, entry: LoadedModel) -> None:
        """Refuse (503) a request once MAX_BATCH_SIZE + MAX_QUEUE requests hold the model: running,
        waiting for a batch slot, or being prepared, generations and embeddings together."""
        batch, queue = self.settings.max_batch_size, self.settings.max_queue
        if entry.active < batch + queue:
            return
        running = min(entry.active, batch)
        raise ServerBusy(
            f"server busy: model '{entry.name}' is running {running} requests with {entry.active - running} "
            f"waiting (MAX_BATCH_SIZE={batch}, MAX_QUEUE={queue}); try again shortly",
            retry_after=1,
        )

    async def unload(self, name: str) -> bool:
        """Unload a model (its embedding runner too) now, after its running requests finish.
        False if it was not loaded."""
        model = parse_model_name(name).name
        self._forget_adapter(model)
        keys = [key for key in (pool_key(model, "generate"), pool_key(model, "embed")) if key in self._loaded]
        for key in keys:
            await self._evict(key)
        return bool(keys)

    def forget_failure(self, name: str) -> None:
        """A fresh pull may have fixed the model: allow an immediate retry."""
        model = parse_model_name(name).name
        self._forget_adapter(model)
        for purpose in ("generate", "embed"):
            self._failures.pop(pool_key(model, purpose), None)

    async def _lease_adapter(self, adapter: Adapter, **acquire: Any) -> Lease:
        """Lease the base's runner (loading it if needed) with `adapter` attached."""
        await asyncio.to_thread(base_snapshot, adapter)
        base = adapter.base.name
        lease = await self.acquire(base, **acquire)
        try:
            if lease.runner.backend == "vllm" and not getattr(lease.runner, "lora_enabled", False):
                # The engine started before any adapter of its model was pulled: restart it with LoRA.
                log.info("restarting %s's vLLM engine with LoRA enabled for '%s'", base, adapter.name)
                await lease.release()
                await self.unload(base)
                lease = await self.acquire(base, **acquire)
            try:
                await lease.runner.attach_adapter(adapter)
            except AdapterRefused as refused:
                log.info("vLLM refuses '%s' (%s): serving it with PEFT on transformers", adapter.name, refused)
                await lease.release()
                # The transformers runner of the same weights the pool keeps beside a vLLM model.
                lease = await self.acquire(base, **{**acquire, "purpose": "embed"})
                await lease.runner.attach_adapter(adapter)
        except BaseException:
            await lease.release()
            raise
        lease.runner = AdapterRunner(lease.runner, adapter)
        return lease

    def _forget_adapter(self, name: str) -> None:
        """An adapter deleted or pulled anew: found and attached afresh by its next request."""
        self.adapters.forget(name)
        for entry in self._loaded.values():
            entry.runner.adapters.pop(name, None)

    # -- introspection ---------------------------------------------------------------------
    def snapshot(self) -> list[ModelSnapshot]:
        """Every loaded entry (embedding runners included), least recently used first."""
        return [entry.snapshot() for entry in self._loaded.values()]

    def snapshot_of(self, name: str) -> ModelSnapshot | None:
        """The model's generation entry, if loaded."""
        entry = self._loaded.get(parse_model_name(name).name)
        return entry.snapshot() if entry else None

    def loaded(self) -> list[LoadedModel]:
        """The pool's own entries, runners included: for the runtime's internals and tests, not readers."""
        return list(self._loaded.values())

    def get_loaded(self, name: str) -> LoadedModel | None:
        """The model's generation entry, if loaded (internal, as `loaded`)."""
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
        local = await asyncio.to_thread(self.loader.find, source)  # reads the cache: off the event loop
        if local is None:
            raise ModelNotFound(
                f"model '{source.name}' is not pulled; pull it first (POST /pull or /api/pull with "
                f'{{"model": "{source.name}"}})',
                param="model",
            )
        if purpose == "embed":
            plan = await asyncio.to_thread(self.loader.plan, local, quantize)
            if _engine_embeds(plan.backend):
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

    async def _load(self, name: str, local: LocalModel, quantize: QuantizeRequest, purpose: Purpose) -> LoadedModel:
        key = pool_key(name, purpose)
        async with self._load_lock:
            if key in self._loaded:  # loaded while this task waited for the lock
                return self._loaded[key]
            plan = await asyncio.to_thread(self.loader.plan, local, quantize)
            if purpose == "embed":
                plan = _embedding_plan(plan)
            backend = plan.backend
            await self._evict_lru(
                lambda: (
                    self._model_count(name) > self.settings.max_cache_models or self._over_budget(plan.estimate_bytes)
                )
            )
            started = time.perf_counter_ns()
            try:
                runner = await asyncio.to_thread(self.loader.load, local, plan)
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
                parsers=plan.parsers,
                purpose=purpose,
            )
            log.info(
                "loaded %s on %s (%s, %s) in %.2fs",
                key,
                backend.name,
                self.device,
                plan.precision.mode,
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
            await self.expire_idle(time.time())

    async def expire_idle(self, now: float) -> None:
        """Unload every idle entry whose keep-alive has passed by `now` (epoch seconds)."""
        for entry in [e for e in self._loaded.values() if e.active == 0 and e.expires_at and e.expires_at <= now]:
            log.info("keep-alive of %s expired", entry.key)
            try:
                await self._evict(entry.key)
            except Exception:  # one failed unload must not stop every later expiry
                log.exception("unloading %s failed; it is no longer served", entry.key)


def _embedding_plan(plan: LoadPlan) -> LoadPlan:
    """The plan of a model's embedding runner: its weights and precision, on transformers."""
    backend = BackendChoice(
        "transformers",
        f"embeddings: {plan.backend.reason}, and vLLM's generation "
        "engine cannot embed: a transformers runner of the same weights embeds",
    )
    return dataclasses.replace(plan, backend=backend)


def _engine_embeds(backend: BackendChoice) -> bool:
    """vLLM's generation engine cannot embed; the transformers runner can."""
    return backend.name == "transformers"
