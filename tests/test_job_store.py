"""The job store's guarantees under concurrency, on a real PostgreSQL server and on a SQLite file.

Replicas are separate processes; here several JobStores (each with its own connection pool, as
each replica has) race from threads, which is what the database sees from replicas. The end-to-end
behaviour with real servers is in test_replicas.py.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.models import PullJob, active_key
from jobs.store import JobStore


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def stores(database_url: str) -> Iterator[Callable[[], JobStore]]:
    """Make stores ("replicas") on the same, initially empty, database."""
    made: list[JobStore] = []

    def make() -> JobStore:
        store = JobStore(database_url)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def new_job(model: str, init: bool = False) -> PullJob:
    return PullJob(model=model, repo_id=model.split(":")[0], init=init, active_key=active_key(model, init))


def run_together(functions: list[Callable[[], object]]) -> list[object]:
    """Start every function at the same moment (a barrier), return their results."""
    barrier = threading.Barrier(len(functions))

    def call(fn: Callable[[], object]) -> object:
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(len(functions)) as pool:
        return list(pool.map(call, functions))


def test_replicas_creating_the_schema_together_all_succeed(stores) -> None:
    replicas = [stores() for _ in range(4)]
    run_together([store.create_schema for store in replicas])
    assert replicas[0].page(10, 0) == ([], 0)


def test_the_same_pull_submitted_to_several_replicas_at_once_makes_one_job(stores) -> None:
    replicas = [stores() for _ in range(4)]
    replicas[0].create_schema()
    joined = run_together([lambda s=s: s.add_or_join(new_job("org/m"), [active_key("org/m", False)]) for s in replicas])
    assert len({job.id for job in joined}) == 1  # type: ignore[attr-defined]
    assert replicas[0].page(10, 0)[1] == 1


def test_each_job_is_claimed_by_exactly_one_replica_and_one_download_per_repo(stores) -> None:
    replicas = [stores() for _ in range(4)]
    replicas[0].create_schema()
    for n in range(6):
        replicas[0].add_or_join(new_job(f"org/m{n}"), [active_key(f"org/m{n}", False)])
    replicas[0].add_or_join(new_job("org/m0", init=True), [active_key("org/m0", True)])  # same repo as m0

    def claim_all(store: JobStore, owner: str) -> list[str]:
        claimed = []
        for _ in range(20):
            job = store.claim(owner, lease_seconds=60)
            if job is not None:
                claimed.append(job.id)
        return claimed

    results = run_together([lambda s=s, n=n: claim_all(s, f"replica-{n}") for n, s in enumerate(replicas)])
    claimed = [job_id for ids in results for job_id in ids]  # type: ignore[union-attr]
    assert len(claimed) == len(set(claimed)) == 6  # six repos: the second m0 job waits for the first
    jobs, _ = replicas[0].page(10, 0)
    waiting = [j for j in jobs if j.status == "queued"]
    assert [(j.model, j.init) for j in waiting] == [("org/m0", True)]


def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_write(stores) -> None:
    a, b = stores(), stores()
    a.create_schema()
    job = a.add_or_join(new_job("org/m"), [active_key("org/m", False)])
    assert a.claim("replica-a", lease_seconds=0.5) is not None
    assert b.claim("replica-b", lease_seconds=60) is None  # the lease still holds
    time.sleep(0.7)
    taken = b.claim("replica-b", lease_seconds=60)
    assert taken is not None and taken.id == job.id and taken.owner == "replica-b" and taken.attempts == 2
    assert "replica-a" in (taken.note or "")
    assert a.renew("replica-a", [job.id], 60) == set()  # a learns it lost the job...
    assert not a.update_owned(job.id, "replica-a", completed_bytes=5)  # ...and cannot write to it
    assert not a.finish(job.id, "replica-a", "failed", error="late")
    assert b.finish(job.id, "replica-b", "succeeded")
    done = b.get(job.id)
    assert done is not None and (done.status, done.error, done.active_key, done.repo_lock) == (
        "succeeded",
        None,
        None,
        None,
    )


def test_a_graceful_stop_hands_running_jobs_back(stores) -> None:
    a, b = stores(), stores()
    a.create_schema()
    job = a.add_or_join(new_job("org/m"), [active_key("org/m", False)])
    a.claim("replica-a", lease_seconds=60)
    assert a.hand_back("replica-a") == 1
    taken = b.claim("replica-b", lease_seconds=60)
    assert taken is not None and taken.id == job.id and "handed back by replica replica-a" in (taken.note or "")


def test_a_job_table_from_the_previous_version_is_brought_up_to_date(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the table as the single-server version made it
        conn.execute("""CREATE TABLE pull_jobs (id VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, revision VARCHAR,
            quantize VARCHAR NOT NULL, init BOOLEAN NOT NULL, status VARCHAR NOT NULL, created_at DATETIME NOT NULL,
            started_at DATETIME, finished_at DATETIME, local_path VARCHAR, preferred_quantized BOOLEAN, error TEXT,
            completed_bytes BIGINT NOT NULL, total_bytes BIGINT, attempts INTEGER NOT NULL, note TEXT,
            loaded BOOLEAN, quantization VARCHAR, load_error TEXT)""")
        conn.execute("""INSERT INTO pull_jobs VALUES ('j1', 'org/m', NULL, 'auto', 0, 'running',
            '2026-11-01 00:00:00', NULL, NULL, NULL, NULL, NULL, 0, NULL, 1, NULL, NULL, NULL, NULL)""")
    store = JobStore(f"sqlite:///{db}")
    try:
        store.create_schema()
        job = store.claim("replica-a", lease_seconds=60)
        assert job is not None and (job.id, job.repo_id, job.repo_lock, job.attempts) == ("j1", "org/m", "org/m", 2)
    finally:
        store.close()
