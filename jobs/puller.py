"""Background pulls: every `POST /pull` becomes a job that downloads with huggingface_hub.

Jobs are asyncio tasks inside the service; at most MAX_CONCURRENT_PULLS download at once, the rest
wait `queued`. The blocking `snapshot_download` runs in a thread and reports bytes through a tqdm
class; the job row gets them every PROGRESS_INTERVAL seconds. While a repo downloads it carries the
local cache's pull marker, so a half-downloaded snapshot is never listed or served, even after a
crash. Jobs left unfinished by a stop or a crash are resumed at the next start: files completed
before keep their place in the cache, a file cut midway is fetched again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import threading
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

from huggingface_hub import HfApi, snapshot_download
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
from jobs.models import PullJob, utcnow
from jobs.store import JobStore
from runners.local_cache import LocalModel, find_local, hub_cache_dir, pull_marker, repo_dir
from runners.names import ModelRef, parse_model_name
from runners.pool import ModelPool
from runners.quantization import QuantizeRequest, bitsandbytes_available, decide_precision
from settings import Settings

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress writes to the job row
# huggingface_hub reports progress, and so lets a stopping server interrupt a download, once per
# chunk read from the network: 10 MB by default, too coarse to watch on a slow link.
hf_constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024
DEFAULT_ENDPOINT = "https://huggingface.co"


class PullInterrupted(Exception):
    """Raised in a download thread when the server stops; the job stays unfinished and resumes later."""


class IncompleteDownload(Exception):
    """snapshot_download returned, yet the local cache does not hold a complete snapshot."""


class Puller:
    def __init__(self, store: JobStore, pool: ModelPool, settings: Settings) -> None:
        self.store = store
        self._pool = pool
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.max_concurrent_pulls)
        self._repo_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one pull per repo folder
        self._live: dict[str, PullJob] = {}  # model name -> its queued or running job
        self._queued: set[str] = set()
        self._downloading: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the schema and pick up the jobs a previous run left queued or running."""
        await asyncio.to_thread(self.store.create_schema)
        for job in await asyncio.to_thread(self.store.unfinished):
            note = f"the server stopped while this job was {job.status}; resumed at restart"
            job = await asyncio.to_thread(self.store.update, job.id, status="queued", note=note)
            log.info("resuming pull job %s (%s)", job.id, job.model)
            self._live[job.model] = job
            self._schedule(job)

    async def stop(self) -> None:
        """Stop downloads without finishing their jobs: they resume at the next start."""
        self._stopping.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    # -- requests --------------------------------------------------------------------------
    async def submit(self, ref: ModelRef, quantize: QuantizeRequest, init: bool) -> PullJob:
        """Start a pull, or join the one already under way for this model.

        A pull that asks for `init` does not join a running pull without it: it gets its own job,
        which waits for the running one and then finds the files already in the cache.
        """
        live = self._live.get(ref.name)
        if live is not None and (live.init or not init):
            return live
        job = PullJob(model=ref.name, revision=ref.revision, quantize=quantize, init=init)
        self._live[ref.name] = job  # before the first await: a concurrent duplicate joins this job
        try:
            await asyncio.to_thread(self.store.add, job)
        except BaseException:
            self._live.pop(ref.name, None)
            raise
        self._schedule(job)
        return job

    async def get(self, job_id: str) -> PullJob | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def newest_first(self) -> list[PullJob]:
        return await asyncio.to_thread(self.store.newest_first)

    @property
    def downloads_active(self) -> int:
        return len(self._downloading)

    @property
    def downloads_queued(self) -> int:
        return len(self._queued)

    # -- one job ---------------------------------------------------------------------------
    def _schedule(self, job: PullJob) -> None:
        self._queued.add(job.id)
        task = asyncio.create_task(self._run(job), name=f"pull:{job.model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: PullJob) -> None:
        ref = parse_model_name(job.model)
        try:
            async with self._repo_locks[ref.repo_id], self._slots:
                self._queued.discard(job.id)
                local = await self._download(job, ref)
            if local is not None and job.init:
                await self._load(job)
        finally:
            self._queued.discard(job.id)
            if self._live.get(job.model) is job:
                del self._live[job.model]

    async def _download(self, job: PullJob, ref: ModelRef) -> LocalModel | None:
        """Download the snapshot; None when the job failed or the server is stopping."""
        self._downloading.add(job.id)
        try:
            await asyncio.to_thread(
                self.store.update, job.id, status="running", started_at=utcnow(), attempts=job.attempts + 1
            )
            local, total = await self._fetch_reporting(job.id, ref)
        except PullInterrupted:
            return None
        except Exception as exc:
            log.warning("pull of %s failed: %s: %s", job.model, type(exc).__name__, exc)
            await self._finish(job.id, "failed", error=describe_failure(exc, ref))
            return None
        finally:
            self._downloading.discard(job.id)
        self._pool.forget_failure(job.model)  # the fresh files may fix an earlier failed load
        done = {
            "local_path": str(local.path),
            "completed_bytes": total,
            "total_bytes": total,
            "preferred_quantized": self._prefers_quantized(local, cast(QuantizeRequest, job.quantize)),
        }
        if job.init:
            await asyncio.to_thread(self.store.update, job.id, **done)
        else:
            await self._finish(job.id, "succeeded", **done)
        return local

    async def _load(self, job: PullJob) -> None:
        """`init: true`: load the model through the pool, as a chat would, and record the outcome."""
        try:
            lease = await self._pool.acquire(job.model, quantize=cast(QuantizeRequest, job.quantize))
        except Exception as exc:
            reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            await self._finish(job.id, "failed", loaded=False, load_error=reason,
                               error=f"the download succeeded, but loading the model failed: {reason}")
            return
        mode = lease.runner.precision.mode
        await lease.release()
        await self._finish(job.id, "succeeded", loaded=True, quantization=mode)

    async def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        await asyncio.to_thread(self.store.update, job_id, status=status, finished_at=utcnow(), **fields)

    async def _fetch_reporting(self, job_id: str, ref: ModelRef) -> tuple[LocalModel, int]:
        """Run the download in a thread, writing its progress to the job every PROGRESS_INTERVAL."""
        progress = _Progress(self._stopping)
        fetch = asyncio.ensure_future(asyncio.to_thread(self._fetch, ref, progress))
        written: dict[str, int] | None = None
        try:
            while not fetch.done():
                await asyncio.wait({fetch}, timeout=PROGRESS_INTERVAL)
                state = progress.state()
                if state is not None and state != written:
                    await asyncio.to_thread(self.store.update, job_id, **state)
                    written = state
            return fetch.result()
        finally:
            fetch.cancel()  # when this task is cancelled: drop the thread's result (it stops by itself)

    def _fetch(self, ref: ModelRef, progress: _Progress) -> tuple[LocalModel, int]:
        """The blocking download (in a thread). Returns the complete snapshot and its size."""
        endpoint = hub_endpoint()  # huggingface_hub reads HF_ENDPOINT only at import: pass it on
        info = HfApi(endpoint=endpoint).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        files = info.siblings or []
        total = sum(f.size or 0 for f in files)
        present = _bytes_in_cache(ref.repo_id, files)
        progress.begin(total, present)
        ensure_free_space(total - present, hub_cache_dir())
        _remove_stale_partials(ref.repo_id)
        # Already complete at the commit the Hub serves: only metadata calls follow, and the model
        # stays usable meanwhile. Otherwise the marker hides the repo until the download completes.
        complete = info.sha is not None and find_local(ModelRef(ref.repo_id, info.sha)) is not None
        with nullcontext() if complete else pull_marker(ref.repo_id):
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                cache_dir=hub_cache_dir(),
                endpoint=endpoint,
                tqdm_class=progress.bar_class(),
            )
        local = find_local(ref)
        if local is None:
            raise IncompleteDownload(f"the download of '{ref.name}' ended, but the snapshot is incomplete")
        return local, total

    def _prefers_quantized(self, local: LocalModel, quantize: QuantizeRequest) -> bool:
        """Whether the quantization policy would load this model 4-bit (the original server's field)."""
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


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def ensure_free_space(needed: int, folder: Path) -> None:
    """Fail before a download that cannot fit (huggingface_hub itself only logs a warning)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{needed} bytes to download, {free} bytes free")


def _remove_stale_partials(repo_id: str) -> None:
    """Delete partial files of downloads that died with their process (a crash, a kill).

    huggingface_hub writes each file to a per-process `<blob>.<random>.incomplete` and never reuses
    one, and the local cache treats a repo holding any as unfinished. This process pulls one repo
    at a time, so any partial file present now is dead.
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

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._lock = threading.Lock()  # snapshot_download fetches several files in parallel
        self._total: int | None = None
        self._completed = 0

    def begin(self, total: int, already_complete: int) -> None:
        with self._lock:
            self._total, self._completed = total, already_complete

    def add(self, n: int) -> None:
        if self._stopping.is_set():
            raise PullInterrupted("the server is stopping")
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
    if isinstance(exc, GatedRepoError):
        return (f"'{ref.repo_id}' is a gated model on {endpoint}: accept its conditions on the model page, "
                "then set HF_TOKEN to a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"model '{ref.repo_id}' was not found on {endpoint} (check the name; if the repository is "
                "private, set HF_TOKEN to a token that can read it)")
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
