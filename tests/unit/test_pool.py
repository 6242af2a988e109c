"""The pool's policy with a fake loader: LRU eviction by count and by memory, keep-alive expiry,
the cooldown after a failed load, single-flight loads and admission at the lease."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from errors import ModelCoolingDown, ModelLoadFailed, ModelNotFound, ServerBusy
from runners.pool import ModelPool
from settings import Settings
from tests.support.fake_engine import FakeLoader

A, B, C = "org/a", "org/b", "org/c"


def make_pool(loader: FakeLoader, **settings: object) -> ModelPool:
    defaults: dict[str, object] = {"max_cache_models": 2, "keep_alive": 300.0, "model_load_cooldown": 300.0}
    return ModelPool(Settings.model_validate({**defaults, **settings}), loader=loader)


async def use(pool: ModelPool, name: str, **kwargs: object) -> None:
    """One request: lease the model and give it back."""
    lease = await pool.acquire(name, **kwargs)  # type: ignore[arg-type]
    await lease.release()


def names(pool: ModelPool) -> list[str]:
    return [model.name for model in pool.snapshot()]


async def test_the_least_recently_used_model_is_evicted_beyond_max_cache_models() -> None:
    loader = FakeLoader({A: 100, B: 100, C: 100})
    pool = make_pool(loader, max_cache_models=2)
    for name in (A, B, A):  # B is now the least recently used
        await use(pool, name)
    await use(pool, C)
    assert names(pool) == [A, C]
    [b] = loader.runners[B]
    assert b.unloaded.is_set()
    assert not any(r.unloaded.is_set() for r in loader.runners[A] + loader.runners[C])
    assert loader.loads == [A, B, C]  # A was reused, not reloaded


async def test_the_memory_budget_evicts_older_models_to_fit() -> None:
    loader = FakeLoader({A: 100, B: 100, C: 30})
    pool = make_pool(loader, max_cache_models=5, model_memory_budget_bytes=150)
    await use(pool, A)
    await use(pool, B)  # 100 + 100 > 150: A goes first
    assert names(pool) == [B] and pool.memory_in_use() == 100
    await use(pool, C)  # 100 + 30 fits
    assert names(pool) == [B, C]


async def test_a_model_evicted_while_in_use_unloads_when_its_last_lease_goes() -> None:
    loader = FakeLoader({A: 100, B: 100})
    pool = make_pool(loader, max_cache_models=1)
    held = await pool.acquire(A)
    await use(pool, B)
    [a] = loader.runners[A]
    assert names(pool) == [B] and not a.unloaded.is_set()  # the running request keeps its model
    await held.release()
    assert a.unloaded.is_set()
    await held.release()  # a second release is a no-op


async def test_an_idle_model_expires_when_its_keep_alive_passes() -> None:
    loader = FakeLoader({A: 100})
    pool = make_pool(loader, keep_alive=10.0)
    before = time.time()
    await use(pool, A)
    [snapshot] = pool.snapshot()
    assert snapshot.expires_at is not None and before + 10 <= snapshot.expires_at <= time.time() + 10
    await pool.expire_idle(snapshot.expires_at - 1)
    assert names(pool) == [A]
    await pool.expire_idle(snapshot.expires_at)
    assert names(pool) == [] and loader.runners[A][0].unloaded.is_set()


async def test_a_model_in_use_never_expires_and_its_clock_starts_at_release() -> None:
    loader = FakeLoader({A: 100})
    pool = make_pool(loader, keep_alive=10.0)
    lease = await pool.acquire(A)
    assert pool.snapshot()[0].expires_at is None
    await pool.expire_idle(time.time() + 3600)
    assert names(pool) == [A]
    await lease.release()
    assert pool.snapshot()[0].expires_at is not None


async def test_keep_alive_zero_unloads_after_the_request_and_none_keeps_forever() -> None:
    loader = FakeLoader({A: 100, B: 100})
    pool = make_pool(loader)
    await use(pool, A, keep_alive=0)
    assert names(pool) == [] and loader.runners[A][0].unloaded.is_set()
    await use(pool, B, keep_alive=None)
    assert pool.snapshot()[0].expires_at is None
    await pool.expire_idle(time.time() + 10**9)
    assert names(pool) == [B]


async def test_a_failed_load_is_not_retried_until_the_cooldown_passes() -> None:
    loader = FakeLoader({A: 100}, broken={A})
    pool = make_pool(loader, model_load_cooldown=300.0)
    with pytest.raises(ModelLoadFailed, match="corrupt"):
        await use(pool, A)
    with pytest.raises(ModelCoolingDown, match="MODEL_LOAD_COOLDOWN") as cooling:
        await use(pool, A)
    assert cooling.value.retry_after is not None and 299 <= cooling.value.retry_after <= 300
    assert loader.loads == [A]  # refused without trying again
    assert set(pool.failed_loads()) == {A}
    pool.forget_failure(A)  # a fresh pull may have fixed it
    with pytest.raises(ModelLoadFailed):
        await use(pool, A)
    assert loader.loads == [A, A]


async def test_with_no_cooldown_a_failed_load_is_retried_at_once() -> None:
    loader = FakeLoader({A: 100}, broken={A})
    pool = make_pool(loader, model_load_cooldown=0)
    for _ in range(2):
        with pytest.raises(ModelLoadFailed):
            await use(pool, A)
    assert loader.loads == [A, A] and pool.failed_loads() == {}


async def test_concurrent_requests_for_a_model_share_one_load() -> None:
    gate = threading.Event()
    loader = FakeLoader({A: 100}, gate=gate)
    pool = make_pool(loader)
    requests = [asyncio.create_task(pool.acquire(A)) for _ in range(4)]
    await asyncio.to_thread(loader.loading.wait, 30)  # the first load runs; the others arrive meanwhile
    gate.set()
    leases = await asyncio.gather(*requests)
    assert loader.loads == [A]
    assert len({id(lease.runner) for lease in leases}) == 1
    assert pool.snapshot()[0].leases == 4
    for lease in leases:
        await lease.release()


async def test_an_unknown_model_is_not_found_and_never_loads() -> None:
    loader = FakeLoader({A: 100})
    pool = make_pool(loader)
    with pytest.raises(ModelNotFound, match="not pulled"):
        await pool.acquire("org/missing")
    assert loader.loads == []


async def test_admission_refuses_beyond_max_batch_size_plus_max_queue() -> None:
    loader = FakeLoader({A: 100})
    pool = make_pool(loader, max_batch_size=1, max_queue=1)
    running, waiting = await pool.acquire(A), await pool.acquire(A)
    with pytest.raises(ServerBusy) as busy:
        await pool.acquire(A)
    assert busy.value.retry_after == 1
    message = str(busy.value)
    assert "server busy" in message and "MAX_BATCH_SIZE=1, MAX_QUEUE=1" in message
    assert "running 1 requests with 1 waiting" in message
    await waiting.release()
    await (await pool.acquire(A)).release()  # room again
    await running.release()


async def test_embeddings_are_admitted_with_the_generations_of_their_model() -> None:
    loader = FakeLoader({A: 100})  # transformers: one runner generates and embeds
    pool = make_pool(loader, max_batch_size=1, max_queue=0)
    held = await pool.acquire(A)
    with pytest.raises(ServerBusy):
        await pool.acquire(A, purpose="embed")
    await held.release()
    embedding = await pool.acquire(A, purpose="embed")
    assert embedding.runner is loader.runners[A][0] and loader.loads == [A]
    await embedding.release()


async def test_a_vllm_model_embeds_with_its_own_entry_admitted_apart() -> None:
    loader = FakeLoader({A: 100}, backend="vllm")  # vLLM's engine cannot embed: a second runner does
    pool = make_pool(loader, max_batch_size=1, max_queue=0, max_cache_models=1)
    generation = await pool.acquire(A)
    embedding = await pool.acquire(A, purpose="embed")  # not refused: a different runner
    assert embedding.runner is not generation.runner and loader.loads == [A, A]
    assert [(m.purpose, m.backend) for m in pool.snapshot()] == [("generate", "vllm"), ("embed", "transformers")]
    assert names(pool) == [A, A]  # one model under MAX_CACHE_MODELS=1: neither evicted the other
    await generation.release()
    await embedding.release()
    assert await pool.unload(A)
    assert names(pool) == [] and all(r.unloaded.is_set() for r in loader.runners[A])


async def test_the_snapshot_reports_what_the_pool_and_the_runner_record() -> None:
    loader = FakeLoader({A: 123})
    pool = make_pool(loader)
    lease = await pool.acquire(A)
    lease.runner.running = 1  # type: ignore[attr-defined]  # the fake engine's batch
    [snapshot] = pool.snapshot()
    assert (snapshot.name, snapshot.purpose, snapshot.backend, snapshot.precision, snapshot.device) == (
        A,
        "generate",
        "transformers",
        "fp32",
        "cpu",
    )
    assert (snapshot.memory_bytes, snapshot.context_length, snapshot.leases, snapshot.running) == (123, 2048, 1, 1)
    assert pool.snapshot_of(A) == snapshot and pool.snapshot_of(B) is None
    with pytest.raises(AttributeError):
        snapshot.leases = 5  # type: ignore[misc]  # frozen: readers cannot change the pool
    await lease.release()
