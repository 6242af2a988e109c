"""Explicit pulls as persistent background jobs, over HTTP.

The real huggingface_hub client downloads from LocalHub (a Hugging-Face-compatible server on
127.0.0.1, via HF_ENDPOINT) into the test's own HF_HOME; jobs live in SQLite in the test's DATA_DIR.
LocalHub's throttle makes a download slow enough to watch, queue behind, or kill halfway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from jobs.puller import describe_failure, ensure_free_space
from runners.names import parse_model_name
from tests.support.bodies import chat_body
from tests.support.fixtures import TINY_GPT2, TINY_LLAMA
from tests.support.hub_server import LocalHub
from tests.support.repo_files import scan_repo
from tests.support.server_process import free_port, kill_server, start_server, wait_healthy

FINISHED = ("succeeded", "failed", "cancelled")
WEIGHTS = "model.safetensors"


def repo_bytes(model_dir: Path) -> int:
    return sum(e.size for e in scan_repo(model_dir))


def pull(client: httpx.Client, model: str, **extra: object) -> str:
    r = client.post("/pull", json={"model": model, **extra})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "accepted"
    return body["job_id"]


def wait_job(
    client: httpx.Client,
    job_id: str,
    until: Callable[[dict], bool] = lambda j: j["status"] in FINISHED,
    timeout: float = 60.0,
    seen: list[dict] | None = None,
) -> dict:
    """Poll /jobs/{id} until `until(job)`; every observed state is appended to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if seen is not None:
            seen.append(job)
        if until(job):
            return job
        assert job["status"] not in FINISHED, f"job finished before reaching the expected state: {job}"
        assert time.monotonic() < deadline, f"job never reached the expected state: {job}"
        time.sleep(0.05)


def listed(client: httpx.Client) -> list[str]:
    return [m["model"] for m in client.get("/models").json()["models"]]


def file_gets(hub: LocalHub, filename: str) -> list:
    return [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)]


# -- the happy path -----------------------------------------------------------------------------------
def test_pull_reports_progress_then_the_model_is_listed_and_chats(serve, local_hub: LocalHub, tiny_llama_dir) -> None:
    total = repo_bytes(tiny_llama_dir)
    local_hub.throttle_bytes_per_sec = 800_000  # the 1.3 MB weights take about 1.7 s
    client = serve()

    job_id = pull(client, TINY_LLAMA)
    seen: list[dict] = []
    running = wait_job(client, job_id, lambda j: j["status"] == "running" and j["completed_bytes"] > 0, seen=seen)
    assert TINY_LLAMA not in listed(client)  # a partial snapshot is not a model
    assert client.post("/chat", json=chat_body(TINY_LLAMA)).status_code == 404
    assert client.get("/health").json()["downloads_active"] == 1
    job = wait_job(client, job_id, seen=seen)

    assert running["total_bytes"] == total
    progress = [j["completed_bytes"] for j in seen]
    assert progress == sorted(progress)
    assert any(0 < c < total for c in progress), progress
    assert job["status"] == "succeeded", job
    assert job["error"] is None
    assert job["completed_bytes"] == job["total_bytes"] == total
    assert job["model"] == TINY_LLAMA and job["init"] is False and job["quantize"] == "auto"
    assert job["preferred_quantized"] is False
    assert job["attempts"] == 1
    for key in ("created_at", "started_at", "finished_at"):
        assert job[key].endswith("Z")
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert client.get("/jobs").json()["jobs"] == [job]

    models = {m["model"]: m for m in client.get("/models").json()["models"]}
    assert models[TINY_LLAMA]["local_path"] == job["local_path"]
    assert models[TINY_LLAMA]["loaded"] is False  # pulled, not loaded: init was false
    assert client.get("/health").json()["downloads_active"] == 0
    r = client.post("/chat", json=chat_body(TINY_LLAMA, max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True


def test_init_loads_the_pulled_model_with_the_requested_quantization(serve, local_hub: LocalHub) -> None:
    client = serve()
    job = wait_job(client, pull(client, TINY_LLAMA, init=True, quantize="q4"))
    assert job["status"] == "succeeded", job
    assert (job["loaded"], job["quantization"], job["load_error"]) == (True, "nf4", None)
    assert job["preferred_quantized"] is True
    model = next(m for m in client.get("/models").json()["models"] if m["model"] == TINY_LLAMA)
    assert (model["loaded"], model["quantization"]) == (True, "nf4")
    r = client.post("/chat", json=chat_body(TINY_LLAMA, max_tokens=4))
    assert r.status_code == 200 and r.json()["load_duration"] == 0  # already loaded by the pull


# -- the queue ------------------------------------------------------------------------------------------
def test_at_most_max_concurrent_pulls_download_the_rest_queue(serve, local_hub: LocalHub, tiny_llama_dir) -> None:
    local_hub.add_repo("test-org/tiny-llama-copy", tiny_llama_dir)
    local_hub.throttle_bytes_per_sec = 200_000
    client = serve(MAX_CONCURRENT_PULLS="2")
    ids = [pull(client, m) for m in (TINY_LLAMA, TINY_GPT2, "test-org/tiny-llama-copy")]

    wait_job(client, ids[1], lambda j: j["status"] == "running")
    statuses = [client.get(f"/jobs/{i}").json()["status"] for i in ids]
    assert statuses == ["running", "running", "queued"]
    health = client.get("/health").json()
    assert (health["downloads_active"], health["downloads_queued"]) == (2, 1)

    local_hub.throttle_bytes_per_sec = None
    assert [wait_job(client, i)["status"] for i in ids] == ["succeeded"] * 3
    health = client.get("/health").json()
    assert (health["downloads_active"], health["downloads_queued"]) == (0, 0)
    assert {TINY_LLAMA, TINY_GPT2, "test-org/tiny-llama-copy"} <= set(listed(client))


def test_a_second_pull_joins_the_running_job_and_a_complete_model_is_not_downloaded_again(
    serve, local_hub: LocalHub
) -> None:
    local_hub.throttle_bytes_per_sec = 500_000
    client = serve()
    first = pull(client, TINY_LLAMA)
    assert pull(client, TINY_LLAMA) == first
    assert pull(client, f"{TINY_LLAMA}:latest") == first  # the same model under its Ollama name
    local_hub.throttle_bytes_per_sec = None
    assert wait_job(client, first)["status"] == "succeeded"
    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [first]
    assert len(file_gets(local_hub, WEIGHTS)) == 1

    started = time.monotonic()
    again = wait_job(client, pull(client, TINY_LLAMA))
    assert again["id"] != first and again["status"] == "succeeded", again
    assert time.monotonic() - started < 5
    assert len(file_gets(local_hub, WEIGHTS)) == 1  # metadata calls only
    assert again["completed_bytes"] == again["total_bytes"] > 0


# -- failures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "setup", "expected"),
    [
        ("test-org/no-such-model", None, "was not found on"),
        (TINY_LLAMA, "gated", "gated model"),
        (TINY_LLAMA, "unreachable", "cannot reach the Hugging Face Hub"),
        (f"{TINY_LLAMA}:no-such-branch", None, "revision 'no-such-branch' was not found"),
    ],
)
def test_a_failed_pull_ends_failed_with_a_readable_error(serve, local_hub: LocalHub, model, setup, expected) -> None:
    env = {}
    if setup == "gated":
        local_hub.gated.add(TINY_LLAMA)
    if setup == "unreachable":
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    client = serve(**env)
    job = wait_job(client, pull(client, model))
    assert job["status"] == "failed"
    assert expected in job["error"], job["error"]
    assert job["finished_at"].endswith("Z")
    assert TINY_LLAMA not in listed(client)
    assert client.get("/health").json()["status"] == "healthy"


def test_a_download_that_cannot_fit_fails_as_disk_full(tmp_path: Path) -> None:
    """A full disk cannot be staged here; the check a pull runs before downloading meets the real one."""
    free = shutil.disk_usage(tmp_path).free
    ensure_free_space(free // 2, tmp_path)
    with pytest.raises(OSError) as caught:
        ensure_free_space(free + 2**30, tmp_path)
    message = describe_failure(caught.value, parse_model_name("org/huge"))
    assert message.startswith("disk full: not enough space in the model cache"), message
    assert "'org/huge'" in message


def test_invalid_names_are_rejected_before_any_job(serve, local_hub: LocalHub) -> None:
    client = serve()
    for name in ("../../etc/passwd", "", "a" * 200, "org/name:bad tag"):
        r = client.post("/pull", json={"model": name})
        assert r.status_code == 400, (name, r.text)
        assert "error" in r.json()
    assert client.post("/pull", json={"model": TINY_LLAMA, "quantize": "q3"}).status_code == 400
    assert client.get("/jobs").json() == {"jobs": [], "total": 0, "limit": 100, "offset": 0}
    assert local_hub.requests == []
    r = client.get("/jobs/no-such-job")
    assert r.status_code == 404 and "no-such-job" in r.json()["error"]


# -- restarts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["default", "DATABASE_URL"])
def test_jobs_survive_a_restart(serve, local_hub: LocalHub, tmp_path: Path, database: str) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'elsewhere' / 'custom.db'}"} if database == "DATABASE_URL" else {}
    db_file = tmp_path / "elsewhere" / "custom.db" if env else tmp_path / "data" / "jobs.db"
    client = serve(**env)
    done = wait_job(client, pull(client, TINY_GPT2))
    failed = wait_job(client, pull(client, "test-org/missing"))
    client.__exit__(None, None, None)
    assert db_file.is_file()

    client = serve(**env)
    assert client.get(f"/jobs/{done['id']}").json() == done
    assert client.get("/jobs").json()["jobs"] == [failed, done]


def test_jobs_interrupted_by_a_stop_resume_at_the_next_start(serve, local_hub: LocalHub) -> None:
    local_hub.throttle_bytes_per_sec = 400_000
    client = serve(MAX_CONCURRENT_PULLS="1")
    running, queued = pull(client, TINY_LLAMA), pull(client, TINY_GPT2)
    wait_job(client, running, lambda j: j["completed_bytes"] > 0)
    client.__exit__(None, None, None)  # a clean stop: jobs stay unfinished, not failed

    local_hub.throttle_bytes_per_sec = None
    client = serve(MAX_CONCURRENT_PULLS="1")
    first, second = wait_job(client, running), wait_job(client, queued)
    assert (first["status"], second["status"]) == ("succeeded", "succeeded")
    assert (first["attempts"], second["attempts"]) == (2, 1)
    assert "handed back by replica" in first["note"], first  # the stop gave the running job back
    assert second["note"] is None  # it never started: it simply waited in the queue
    assert {TINY_LLAMA, TINY_GPT2} <= set(listed(client))


# -- a real server process, killed mid-download ------------------------------------------------------------
@pytest.fixture
def server_process(
    tmp_path: Path, local_hub: LocalHub
) -> Iterator[Callable[[], tuple[httpx.Client, subprocess.Popen]]]:
    """Start `bentoml serve` as a subprocess; returns a client once healthy, and the process."""
    procs: list[subprocess.Popen] = []
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PULL_LEASE_SECONDS": "2",
    }

    def start() -> tuple[httpx.Client, subprocess.Popen]:
        port, log = free_port(), tmp_path / f"server-{len(procs)}.log"
        proc = start_server(env, port, log)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        return httpx.Client(base_url=url, timeout=120), proc  # a first chat loads the model

    yield start
    for proc in procs:
        kill_server(proc)


def test_server_killed_mid_download_resumes_the_job_and_never_serves_half_a_model(
    server_process, local_hub: LocalHub, hf_hub_cache: Path, tiny_llama_dir: Path
) -> None:
    local_hub.throttle_bytes_per_sec = 100_000  # the small files take a second, the weights 13 s
    small_files = repo_bytes(tiny_llama_dir) - (tiny_llama_dir / WEIGHTS).stat().st_size
    client, server = server_process()
    job_id = pull(client, TINY_LLAMA)
    wait_job(client, job_id, lambda j: j["completed_bytes"] >= small_files)
    kill_server(server)  # as a crash or an OOM kill would
    repo = hf_hub_cache / "models--test-org--tiny-llama"
    assert list((repo / "blobs").glob("*.incomplete"))  # the weights, cut off
    assert (repo / "snapshots").is_dir()  # ...beside the files already complete

    client, _ = server_process()  # a short lease (PULL_LEASE_SECONDS=2): the dead owner's expires soon
    job = wait_job(client, job_id, lambda j: j["attempts"] == 2)
    assert job["status"] == "running", job
    assert "stopped renewing its lease" in job["note"]
    assert TINY_LLAMA not in listed(client)
    assert client.post("/chat", json=chat_body(TINY_LLAMA)).status_code == 404

    local_hub.throttle_bytes_per_sec = None
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert len(file_gets(local_hub, "tokenizer.json")) == 1  # complete files were kept, not fetched again
    assert not list((repo / "blobs").glob("*.incomplete"))
    assert TINY_LLAMA in listed(client)
    r = client.post("/chat", json=chat_body(TINY_LLAMA, max_tokens=4))
    assert r.status_code == 200, r.text


def test_a_failed_update_pull_leaves_the_old_snapshot_served_across_a_restart(
    serve, local_hub: LocalHub, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    client = serve()
    old = wait_job(client, pull(client, TINY_LLAMA))
    assert old["status"] == "succeeded", old
    updated = tmp_path / "updated"  # a new commit on the Hub: one more 2 MB file to fetch
    shutil.copytree(tiny_llama_dir, updated)
    (updated / "extra.bin").write_bytes(os.urandom(2_000_000))
    local_hub.add_repo(TINY_LLAMA, updated)
    local_hub.throttle_bytes_per_sec = 300_000

    update = pull(client, TINY_LLAMA)
    wait_job(client, update, lambda j: j["status"] == "running" and j["completed_bytes"] > 0)
    local_hub.stop()  # the Hub goes away mid-download
    failed = wait_job(client, update)
    assert failed["status"] == "failed", failed
    assert TINY_LLAMA in listed(client)  # the version that worked is still the model

    client = serve()  # a restart reads only the cache
    assert TINY_LLAMA in listed(client)
    model = next(m for m in client.get("/models").json()["models"] if m["model"] == TINY_LLAMA)
    assert model["local_path"] == old["local_path"]
    r = client.post("/chat", json=chat_body(TINY_LLAMA, max_tokens=4))
    assert r.status_code == 200, r.text


def test_jobs_are_paginated_newest_first_and_old_finished_jobs_expire(serve, local_hub: LocalHub) -> None:
    client = serve(JOB_RETENTION="1h")
    ids = [wait_job(client, pull(client, f"test-org/missing-{n}"))["id"] for n in range(5)]
    newest_first = ids[::-1]
    page = client.get("/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["id"] for j in page["jobs"]] == newest_first[1:3]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert client.get("/jobs", params={"offset": 5}).json()["jobs"] == []
    for bad in ({"limit": 0}, {"limit": 100_000}, {"offset": -1}, {"limit": "x"}):
        r = client.get("/jobs", params=bad)
        assert r.status_code in (400, 422), (bad, r.text)

    client = serve(JOB_RETENTION="0s")  # a restart with no retention: finished jobs go at once
    deadline = time.monotonic() + 10
    while client.get("/jobs").json()["total"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/jobs").json()["total"] == 0
