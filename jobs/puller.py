"""Background pulls: every `POST /pull` becomes a job that downloads with huggingface_hub.

Jobs live in the database (jobs/store.py) and any replica sharing it may run them. Each replica runs
a supervisor task that, every third of PULL_LEASE_SECONDS (and at once after a submit), renews the
leases of the jobs it runs and claims waiting ones while it has fewer than MAX_CONCURRENT_PULLS:
queued jobs, and running jobs whose owner stopped renewing (killed, crashed, stalled). A graceful
stop hands running jobs back to the queue. The blocking `snapshot_download` runs in a thread and
reports bytes through a tqdm class; the job row gets them every PROGRESS_INTERVAL seconds.

While a repo downloads it carries the local cache's pull marker, so a half-downloaded snapshot is
never listed or served, even after a crash: the marker stays while the job is unfinished (another
replica resumes it) and goes when the job ends. A failed pull puts back the snapshot the repo had
before (an update that failed leaves the old version served). Files completed before an
interruption keep their place in the cache; a file cut midway is fetched again. Only the job's
current owner touches its repo's partial files and marker.

A LoRA adapter repository is checked before its weights download: its `adapter_config.json` must
name a base model that is pulled already, or the job fails saying which base to pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import tqdm as hf_tqdm

from errors import InvalidRequest, ServerError
from jobs.models import PullJob, active_key
from jobs.store import JobStore
from runners.adapters import check_base_pulled
from runners.local_cache import ADAPTER_CONFIG, PULL_MARKER, LocalModel, find_local, hub_cache_dir, repo_dir
from runners.names import ModelRef, parse_model_name
from runners.pool import ModelPool
from runners.quantization import QuantizeRequest, bitsandbytes_available, decide_precision
from settings import Settings

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress writes to the job row
PURGE_INTERVAL = 60.0  # seconds between deletions of jobs past JOB_RETENTION
STOP_WAIT = 15.0  # at most this long a stop waits for download threads to notice it, before handing back
# huggingface_hub reports progress, and so lets a stopping server interrupt a download, once per
# chunk read from the network: 10 MB by default, too coarse to watch on a slow link, and a stopping
# replica hands its job over only once its download thread has noticed (STOP_WAIT).
hf_constants.DOWNLOAD_CHUNK_SIZE = 256 * 1024
DEFAULT_ENDPOINT = "https://huggingface.co"


class PullInterrupted(Exception):
    """Raised in a download thread when the server stops or lost the job; the job stays unfinished."""


class IncompleteDownload(Exception):
    """snapshot_download returned, yet the local cache does not hold a complete snapshot."""


def replica_id() -> str:
    """This process's name as a job owner: readable, and unique even when a pod restarts with the
    same host name and process id."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


@dataclass
class _Active:
    """A job this replica owns: its task, and the flag that stops its download thread."""

    job: PullJob
    interrupt: threading.Event = field(default_factory=threading.Event)
    thread_idle: threading.Event = field(default_factory=lambda: _set(threading.Event()))  # no download thread
    task: asyncio.Task[None] | None = None
    downloading: bool = True


class Puller:
    def __init__(self, store: JobStore, pool: ModelPool, settings: Settings) -> None:
        self.store = store
        self.owner = replica_id()
        self._pool = pool
        self._settings = settings
        self._lease = settings.pull_lease_seconds
        self._tick = max(0.2, min(self._lease / 3, 10.0))  # renew well before the lease runs out
        self._active: dict[str, _Active] = {}  # job id -> a job this replica runs
        self._waiting: set[str] = set()  # jobs submitted here that no replica has started yet
        self._wake: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the schema, then supervise: claim waiting jobs, renew leases, purge old jobs."""
        await asyncio.to_thread(self.store.create_schema)
        self._wake = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(), name="pull-supervisor")

    async def stop(self) -> None:
        """Stop downloads without finishing their jobs and hand them back for any replica to resume."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for active in self._active.values():
            active.interrupt.set()
        stopping = list(self._active.values())
        tasks = [a.task for a in stopping if a.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._wait_for_threads(stopping)
        try:
            handed = await asyncio.to_thread(self.store.hand_back, self.owner)
            if handed:
                log.info("handed %d running pull job(s) back to the queue", handed)
        except Exception:  # the database is gone: the leases expire and another replica takes over
            log.exception("could not hand pull jobs back; they resume when their lease expires")
        self.store.close()

    async def _wait_for_threads(self, stopping: list[_Active]) -> None:
        """A download thread stops at its next chunk: hand its job over only then (keeping the lease
        meanwhile, at most STOP_WAIT), so the replica taking it never downloads beside it."""
        ids = [a.job.id for a in stopping]
        deadline = time.monotonic() + STOP_WAIT
        while any(not a.thread_idle.is_set() for a in stopping) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.renew, self.owner, ids, self._lease)
            wait = min(self._tick, max(0.0, deadline - time.monotonic()))
            await asyncio.to_thread(_wait_all, [a.thread_idle for a in stopping], wait)

    async def ready(self) -> bool:
        """Whether the job database answers."""
        try:
            await asyncio.to_thread(self.store.ping)
            return True
        except Exception as exc:
            log.warning("job database unavailable: %s", exc)
            return False

    # -- requests --------------------------------------------------------------------------
    async def submit(self, ref: ModelRef, quantize: QuantizeRequest, init: bool) -> PullJob:
        """Start a pull, or join the one already under way for this model on any replica.

        A pull that asks for `init` does not join a pull without it: it gets its own job, which
        waits for the running one (one download per repo) and then finds the files in the cache.
        """
        job = PullJob(
            model=ref.name,
            revision=ref.revision,
            quantize=quantize,
            init=init,
            repo_id=ref.repo_id,
            active_key=active_key(ref.name, init),
        )
        joinable = [active_key(ref.name, True)] if init else [active_key(ref.name, False), active_key(ref.name, True)]
        job = await asyncio.to_thread(self.store.add_or_join, job, joinable)
        if job.status == "queued":
            self._waiting.add(job.id)
        if self._wake is not None:
            self._wake.set()
        return job

    async def get(self, job_id: str) -> PullJob | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def page(self, limit: int, offset: int) -> tuple[list[PullJob], int]:
        return await asyncio.to_thread(self.store.page, limit, offset)

    @property
    def downloads_active(self) -> int:
        """Downloads this replica runs now."""
        return sum(1 for a in self._active.values() if a.downloading)

    @property
    def downloads_queued(self) -> int:
        """Jobs submitted to this replica that wait for a download slot (on any replica)."""
        return len(self._waiting)

    # -- supervision -----------------------------------------------------------------------
    async def _supervise(self) -> None:
        assert self._wake is not None
        next_purge = 0.0
        while True:
            self._wake.clear()
            try:
                await self._renew()
                await self._claim_while_free()
                await self._forget_started()
                if self._settings.job_retention is not None and time.monotonic() >= next_purge:
                    await asyncio.to_thread(self.store.purge_finished, self._settings.job_retention)
                    next_purge = time.monotonic() + PURGE_INTERVAL
            except Exception:  # the database may be down for a while: keep trying, never die
                log.exception("pull job supervision failed; retrying in %.1f s", self._tick)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick)

    async def _renew(self) -> None:
        ids = [job_id for job_id, a in self._active.items() if a.task is not None and not a.task.done()]
        kept = await asyncio.to_thread(self.store.renew, self.owner, ids, self._lease)
        for job_id in set(ids) - kept:
            active = self._active.get(job_id)
            if active is not None and active.task is not None and not active.task.done():
                log.warning(
                    "lost pull job %s (%s): its lease expired and another replica took it", job_id, active.job.model
                )
                self._lose(active)

    async def _claim_while_free(self) -> None:
        while self.downloads_active < self._settings.max_concurrent_pulls:  # a job loading its model frees its slot
            job = await asyncio.to_thread(self.store.claim, self.owner, self._lease)
            if job is None:
                return
            self._waiting.discard(job.id)
            log.info("running pull job %s (%s), attempt %d", job.id, job.model, job.attempts)
            active = _Active(job)
            self._active[job.id] = active
            active.task = asyncio.create_task(self._run(active), name=f"pull:{job.model}")
            active.task.add_done_callback(functools.partial(self._done, job.id))

    async def _forget_started(self) -> None:
        """Stop counting as queued the jobs submitted here that a replica (maybe another) started."""
        asked = list(self._waiting)  # jobs submitted while the query runs are not in its answer
        statuses = await asyncio.to_thread(self.store.statuses, asked)
        self._waiting -= {job_id for job_id in asked if statuses.get(job_id) != "queued"}

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(job_id, None)
        if self._wake is not None:
            self._wake.set()  # a slot is free

    def _lose(self, active: _Active) -> None:
        """Another replica owns the job now: stop without writing to it or touching its files."""
        active.interrupt.set()
        if active.task is not None:
            active.task.cancel()

    # -- one job ---------------------------------------------------------------------------
    async def _run(self, active: _Active) -> None:
        job = active.job
        local = await self._download(active, parse_model_name(job.model))
        active.downloading = False
        if local is not None and job.init:
            await self._load(job)

    async def _download(self, active: _Active, ref: ModelRef) -> LocalModel | None:
        """Download the snapshot; None when the job failed, the server is stopping or the job was lost."""
        job = active.job
        previous = await asyncio.to_thread(find_local, ref)  # put back if this pull fails
        try:
            local, total = await self._fetch_reporting(active, ref)
        except PullInterrupted:
            return None
        except Exception as exc:
            log.warning("pull of %s failed: %s: %s", job.model, type(exc).__name__, exc)
            if await self._finish(job, "failed", error=describe_failure(exc, ref)):
                await asyncio.to_thread(_undo_failed_pull, ref, previous)
            return None
        self._pool.forget_failure(job.model)  # the fresh files may fix an earlier failed load
        done = {
            "local_path": str(local.path),
            "completed_bytes": total,
            "total_bytes": total,
            "preferred_quantized": self._prefers_quantized(local, cast(QuantizeRequest, job.quantize)),
        }
        if job.init:  # the files are complete: free the repo for other pulls while the model loads
            await asyncio.to_thread(self.store.update_owned, job.id, self.owner, repo_lock=None, **done)
        else:
            await self._finish(job, "succeeded", **done)
        return local

    async def _load(self, job: PullJob) -> None:
        """`init: true`: load the model through the pool, as a chat would, and record the outcome."""
        try:
            lease = await self._pool.acquire(job.model, quantize=cast(QuantizeRequest, job.quantize))
        except Exception as exc:
            reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            await self._finish(
                job,
                "failed",
                loaded=False,
                load_error=reason,
                error=f"the download succeeded, but loading the model failed: {reason}",
            )
            return
        mode = lease.snapshot().precision
        await lease.release()
        await self._finish(job, "succeeded", loaded=True, quantization=mode)

    async def _finish(self, job: PullJob, status: str, **fields: Any) -> bool:
        """End the job if this replica still owns it; False when another replica took it over."""
        return await asyncio.to_thread(self.store.finish, job.id, self.owner, status, **fields)

    async def _fetch_reporting(self, active: _Active, ref: ModelRef) -> tuple[LocalModel, int]:
        """Run the download in a thread, writing its progress to the job every PROGRESS_INTERVAL."""
        progress = _Progress(active.interrupt)
        active.thread_idle.clear()
        fetch = asyncio.ensure_future(asyncio.to_thread(self._fetch_in_thread, active, ref, progress))
        written: dict[str, int] | None = None
        try:
            while not fetch.done():
                await asyncio.wait({fetch}, timeout=PROGRESS_INTERVAL)
                state = progress.state()
                if state is not None and state != written:
                    if not await asyncio.to_thread(self.store.update_owned, active.job.id, self.owner, **state):
                        self._lose(active)  # taken over: this task is cancelled at the next await
                    written = state
            if active.interrupt.is_set():  # lost or stopping while the last bytes arrived
                raise PullInterrupted("the job was interrupted")
            return fetch.result()
        finally:
            fetch.cancel()  # when this task is cancelled: drop the thread's result (it stops by itself)

    def _fetch_in_thread(self, active: _Active, ref: ModelRef, progress: _Progress) -> tuple[LocalModel, int]:
        try:
            return self._fetch(ref, progress)
        finally:
            active.thread_idle.set()

    def _fetch(self, ref: ModelRef, progress: _Progress) -> tuple[LocalModel, int]:
        """The blocking download (in a thread). Returns the complete snapshot and its size."""
        endpoint = hub_endpoint()  # huggingface_hub reads HF_ENDPOINT only at import: pass it on
        info = HfApi(endpoint=endpoint).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        files = info.siblings or []
        names = {f.rfilename for f in files}
        if ADAPTER_CONFIG in names and "config.json" not in names:
            _check_adapter(ref, info.sha or ref.revision, endpoint)
        total = sum(f.size or 0 for f in files)
        present = _bytes_in_cache(ref.repo_id, files)
        progress.begin(total, present)
        ensure_free_space(total - present, hub_cache_dir())
        _remove_stale_partials(ref.repo_id)
        # Already complete at the commit the Hub serves: only metadata calls follow, and the model
        # stays usable meanwhile. Otherwise the marker hides the repo until the download completes.
        complete = info.sha is not None and find_local(ModelRef(ref.repo_id, info.sha)) is not None
        if not complete:
            _set_marker(ref.repo_id)
        snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=hub_cache_dir(),
            endpoint=endpoint,
            tqdm_class=progress.bar_class(),
        )
        progress.check()  # interrupted meanwhile: another replica may own the repo now
        _clear_marker(ref.repo_id)
        local = find_local(ref)
        if local is None:
            raise IncompleteDownload(f"the download of '{ref.name}' ended, but the snapshot is incomplete")
        return local, total

    def _prefers_quantized(self, local: LocalModel, quantize: QuantizeRequest) -> bool:
        """Whether the quantization policy would load this model 4-bit (the original server's field)."""
        if local.is_adapter:  # an adapter follows its base's precision
            return False
        try:
            return decide_precision(
                quantize,
                weight_bytes=local.weight_bytes,
                threshold_bytes=self._settings.model_q4_threshold_bytes,
                device=self._pool.device,
                config=local.config(),
                bnb_available=bitsandbytes_available(),
            ).quantized
        except InvalidRequest:  # q4 without bitsandbytes: preferred, though a load will refuse it
            return True


def _check_adapter(ref: ModelRef, revision: str | None, endpoint: str) -> None:
    """A LoRA adapter's config, fetched alone before anything is downloaded into the cache: its
    base must be pulled (ModelNotFound naming the base, InvalidRequest for an adapter not served)."""
    with tempfile.TemporaryDirectory() as folder:
        path = hf_hub_download(ref.repo_id, ADAPTER_CONFIG, revision=revision, local_dir=folder, endpoint=endpoint)
        config = json.loads(Path(path).read_text())
    check_base_pulled(config, ref.name)


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def ensure_free_space(needed: int, folder: Path) -> None:
    """Fail before a download that cannot fit (huggingface_hub itself only logs a warning)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{needed} bytes to download, {free} bytes free")


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


def _wait_all(events: list[threading.Event], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for done in events:
        done.wait(max(0.0, deadline - time.monotonic()))


def _set_marker(repo_id: str) -> None:
    marker = repo_dir(repo_id) / PULL_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))


def _clear_marker(repo_id: str) -> None:
    (repo_dir(repo_id) / PULL_MARKER).unlink(missing_ok=True)


def _undo_failed_pull(ref: ModelRef, previous: LocalModel | None) -> None:
    """After a failed pull (its job ended, so nobody resumes it): drop its partial files and marker,
    and point the ref back at the snapshot that was complete before, which huggingface_hub had
    already moved to the new commit."""
    _remove_stale_partials(ref.repo_id)
    if previous is not None:
        ref_file = repo_dir(ref.repo_id) / "refs" / (ref.revision or "main")
        if ref_file.is_file() and ref_file.read_text().strip() != previous.commit:
            ref_file.write_text(previous.commit)
    _clear_marker(ref.repo_id)


def _remove_stale_partials(repo_id: str) -> None:
    """Delete partial files of downloads that died with their process (a crash, a kill).

    huggingface_hub writes each file to a per-process `<blob>.<random>.incomplete` and never reuses
    one, and the local cache treats a repo holding any as unfinished. Only the owner of the job that
    holds the repo's lock calls this (one download per repo across replicas), so any partial file
    present now is dead.
    """
    for partial in (repo_dir(repo_id) / "blobs").glob("*.incomplete"):
        partial.unlink(missing_ok=True)


def _bytes_in_cache(repo_id: str, files: list[RepoSibling]) -> int:
    """Bytes of the repo's files already complete in the cache (a resumed or a repeated pull)."""
    blobs = repo_dir(repo_id) / "blobs"
    present = 0
    for f in files:
        etag = f.lfs.sha256 if f.lfs else f.blob_id  # huggingface_hub names blobs by these
        if etag and (blobs / etag).is_file():
            present += f.size or 0
    return present


class _Progress:
    """Byte progress of one download, fed by its threads as chunks reach the disk."""

    def __init__(self, interrupt: threading.Event) -> None:
        self._interrupt = interrupt
        self._lock = threading.Lock()  # snapshot_download fetches several files in parallel
        self._total: int | None = None
        self._completed = 0

    def begin(self, total: int, already_complete: int) -> None:
        with self._lock:
            self._total, self._completed = total, already_complete

    def check(self) -> None:
        if self._interrupt.is_set():
            raise PullInterrupted("the server is stopping or another replica took the job over")

    def add(self, n: int) -> None:
        self.check()
        with self._lock:
            self._completed += n

    def state(self) -> dict[str, int] | None:
        """The job fields to write, None before the download's size is known."""
        with self._lock:
            if self._total is None:
                return None
            return {"completed_bytes": min(self._completed, self._total), "total_bytes": self._total}

    def bar_class(self) -> type[hf_tqdm]:
        """A silent tqdm class for snapshot_download that feeds this progress.

        snapshot_download opens several bars with it; the one named "huggingface_hub.snapshot_download"
        sums the bytes written to disk by every file download.
        """
        progress = self

        class _Bar(hf_tqdm):
            def __init__(self, *args: Any, name: str | None = None, **kwargs: Any) -> None:
                kwargs["disable"] = True  # a server prints no progress bars
                super().__init__(*args, name=name, **kwargs)
                self._counts_bytes = name == "huggingface_hub.snapshot_download"

            def update(self, n: float | None = 1) -> bool | None:
                if self._counts_bytes and n:
                    progress.add(int(n))
                return super().update(n)

        return _Bar


def describe_failure(exc: BaseException, ref: ModelRef) -> str:
    """A sentence a user can act on, for the ways a pull fails."""
    endpoint = hub_endpoint()
    if isinstance(exc, ServerError):  # refused on purpose (an adapter whose base is not pulled): says why
        return exc.message
    if isinstance(exc, GatedRepoError):
        return (
            f"'{ref.repo_id}' is a gated model on {endpoint}: accept its conditions on the model page, "
            "then set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"model '{ref.repo_id}' was not found on {endpoint} (check the name; if the repository is "
            "private, set HF_TOKEN to a token that can read it)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"revision '{ref.revision}' was not found in '{ref.repo_id}' on {endpoint}"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return f"not authorized to download '{ref.repo_id}' from {endpoint} (HTTP {status}): check HF_TOKEN"
        return f"the Hub at {endpoint} answered HTTP {status} for '{ref.repo_id}': {exc}"
    if (full := _no_space(exc)) is not None:
        return f"disk full: not enough space in the model cache {hub_cache_dir()} for '{ref.name}' ({full})"
    if isinstance(exc, (HTTPError, LocalEntryNotFoundError)):  # transport errors: refused, timed out, cut
        return f"cannot reach the Hugging Face Hub at {endpoint} (check the network or HF_ENDPOINT): {exc}"
    return f"pulling '{ref.name}' failed: {type(exc).__name__}: {exc}"


def _no_space(exc: BaseException | None) -> OSError | None:
    """The ENOSPC error behind `exc`, if any (huggingface_hub may wrap it)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
