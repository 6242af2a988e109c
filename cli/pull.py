"""`ai-server pull`: start a pull job (`POST /pull`) and follow it (`GET /jobs/{id}`) with a progress bar.

Ctrl-C stops following, not the pull: the job keeps running on the server, and pulling the same
model again joins it (the server hands back the running job for a model already being pulled).
"""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.client import CliError, Server
from cli.render import err, out

POLL_SECONDS = 0.25  # the server writes a job's progress every half second
FINISHED = ("succeeded", "failed", "cancelled")


def pull(server: Server, model: str, quantize: str, load: bool) -> dict[str, Any]:
    """Start the pull and follow it to the end; returns the finished job, raises CliError if it failed."""
    job_id = server.post("/pull", {"model": model, "quantize": quantize, "init": load})["job_id"]
    again = (
        f"ai-server pull {model}"
        + (f" --quantize {quantize}" if quantize != "auto" else "")
        + (" --load" if load else "")
    )
    try:
        job = follow(server, job_id)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following; the pull goes on in the server (job {job_id}). Follow it again with "
            f"`{again}`, or see it in `ai-server jobs`.",
            exit_code=130,
        ) from None
    if job["status"] != "succeeded":
        reason = job.get("load_error") or job.get("error") or job["status"]
        raise CliError(f"pulling '{model}' failed: {reason}")
    if job.get("loaded"):
        out.print(f"success: '{model}' is pulled and loaded ({job.get('quantization')})")
    else:
        out.print(f"success: '{model}' is pulled")
    return job


def follow(server: Server, job_id: str) -> dict[str, Any]:
    """Poll the job until it finishes, drawing its byte progress (on a terminal: a live bar)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        task: TaskID | None = None
        while True:
            job = server.get(f"/jobs/{job_id}")
            task = _draw(progress, task, job)
            if job["status"] in FINISHED:
                return job
            time.sleep(POLL_SECONDS)


def _draw(progress: Progress, task: TaskID | None, job: dict[str, Any]) -> TaskID:
    total, done = job.get("total_bytes"), job.get("completed_bytes") or 0
    if job["status"] == "queued":
        description = f"{job['model']}: queued"
    elif job["status"] == "running" and job.get("init") and total and done >= total:
        description = f"{job['model']}: loading"
    else:
        description = f"pulling {job['model']}"
    if task is None:
        return progress.add_task(description, total=total or None, completed=done)
    progress.update(task, description=description, total=total or None, completed=done)
    return task
