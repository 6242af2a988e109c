"""Several real `bentoml serve` replicas sharing one job database, one HF cache and one Hub.

Each replica is a real server process. They share DATABASE_URL (a real PostgreSQL server started
by tests/support/postgres.py, or one SQLite file, as replicas on one host would), HF_HOME and a
LocalHub whose throttle keeps a download in progress. Leases are short (PULL_LEASE_SECONDS=2) so a
takeover happens within seconds. LocalHub counts the GETs of a file that send at the same time:
"one download at a time" is checked there, where two downloads would show.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures import TINY_LLAMA
from tests.support.hub_server import LocalHub
from tests.support.server_process import (
    free_port,
    kill_server,
    process_tree_pids,
    start_server,
    stop_server,
    wait_healthy,
)
from tests.test_pull_jobs import WEIGHTS, listed, pull, wait_job

LEASE_SECONDS = 2.0
WEIGHTS_KEY = f"{TINY_LLAMA}/{WEIGHTS}"


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database every replica of the test shares."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return f"sqlite:///{tmp_path / 'shared' / 'jobs.db'}"


@dataclass
class Replica:
    proc: subprocess.Popen
    client: httpx.Client
    log: Path

    def owns(self, job: dict) -> bool:
        pid = int(job["owner"].split("/")[1])
        return pid in process_tree_pids(self.proc)


class Cluster:
    """Replicas started on demand with the same environment; all are killed at teardown."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self._tmp, self._env = tmp_path, env
        self.replicas: list[Replica] = []

    def start(self, count: int = 1) -> list[Replica]:
        """Start `count` replicas at the same moment, then wait until each answers."""
        started = []
        for _ in range(count):
            n = len(self.replicas)
            port, log = free_port(), self._tmp / f"replica-{n}.log"
            env = {**self._env, "DATA_DIR": str(self._tmp / f"data-{n}")}
            replica = Replica(
                start_server(env, port, log), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30), log
            )
            self.replicas.append(replica)
            started.append(replica)
        for replica in started:
            wait_healthy(str(replica.client.base_url), replica.proc, replica.log, timeout=120)
        return started

    def owner_of(self, job: dict) -> Replica:
        return next(r for r in self.replicas if r.owns(job))

    def close(self) -> None:
        for replica in self.replicas:
            kill_server(replica.proc)


@pytest.fixture
def cluster(tmp_path: Path, local_hub: LocalHub, database_url: str) -> Iterator[Cluster]:
    # HF_HOME (one cache for all) and HF_ENDPOINT come from local_hub through the environment.
    env = {
        "DATABASE_URL": database_url,
        "PULL_LEASE_SECONDS": str(LEASE_SECONDS),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    group = Cluster(tmp_path, env)
    yield group
    group.close()


def partial_files(local_hub: LocalHub) -> list[Path]:
    return list(
        (Path(local_hub.root).parent / "hf-home" / "hub" / "models--test-org--tiny-llama" / "blobs").glob(
            "*.incomplete"
        )
    )


def test_replicas_started_together_share_one_job_and_a_graceful_stop_hands_it_back(
    cluster: Cluster, local_hub: LocalHub
) -> None:
    local_hub.throttle_bytes_per_sec = 150_000  # the 1.3 MB weights take about 9 s: stopped well before
    a, b = cluster.start(2)  # together, on an empty database: both create the schema

    with ThreadPoolExecutor(2) as threads:  # the same pull sent to both at once
        ids = list(threads.map(lambda r: pull(r.client, TINY_LLAMA), (a, b)))
    assert ids[0] == ids[1], ids
    job_id = ids[0]
    for replica in (a, b):
        assert [j["id"] for j in replica.client.get("/jobs").json()["jobs"]] == [job_id]

    job = wait_job(a.client, job_id, lambda j: j["status"] == "running" and j["completed_bytes"] > 0)
    owner = cluster.owner_of(job)
    other = b if owner is a else a
    stop_server(owner.proc)  # SIGTERM, as Kubernetes stops a pod

    job = wait_job(other.client, job_id, lambda j: j["attempts"] == 2)
    assert other.owns(job), job
    assert "handed back by replica" in job["note"], job
    local_hub.throttle_bytes_per_sec = None
    job = wait_job(other.client, job_id)
    assert job["status"] == "succeeded", job
    assert job["error"] is None
    assert local_hub.peak_downloads[WEIGHTS_KEY] == 1  # never two downloads of the weights at once
    assert len(other.client.get("/jobs").json()["jobs"]) == 1
    assert TINY_LLAMA in listed(other.client)


def test_a_replica_killed_mid_pull_is_taken_over_and_a_new_replica_leaves_the_download_alone(
    cluster: Cluster, local_hub: LocalHub
) -> None:
    local_hub.throttle_bytes_per_sec = 20_000  # the weights would take a minute: longer than a start under load
    (first,) = cluster.start(1)
    job_id = pull(first.client, TINY_LLAMA)
    job = wait_job(first.client, job_id, lambda j: j["status"] == "running")
    while not partial_files(local_hub):  # the weights are on their way
        assert wait_job(first.client, job_id, lambda j: True)["status"] == "running"
        time.sleep(0.1)

    (second,) = cluster.start(1)  # starts mid-pull
    time.sleep(2.5 * LEASE_SECONDS)  # several of its supervision rounds
    job = second.client.get(f"/jobs/{job_id}").json()
    assert first.owns(job) and job["attempts"] == 1 and job["status"] == "running", job
    assert partial_files(local_hub), "the new replica removed the running download's partial file"
    assert local_hub.peak_downloads[WEIGHTS_KEY] == 1

    kill_server(first.proc)  # kill -9 of the owner's whole process tree
    local_hub.throttle_bytes_per_sec = None
    job = wait_job(second.client, job_id, lambda j: j["attempts"] == 2, timeout=30)
    assert second.owns(job), job
    assert "stopped renewing its lease" in job["note"], job
    job = wait_job(second.client, job_id)
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert local_hub.peak_downloads[WEIGHTS_KEY] == 1
    assert not partial_files(local_hub)
    assert TINY_LLAMA in listed(second.client)
