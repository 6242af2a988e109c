"""The pull job table: one row per `POST /pull`, the record a user watches and reads failures from."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import BigInteger, DateTime, Text
from sqlmodel import Field, SQLModel

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED: tuple[JobStatus, ...] = ("queued", "running")
PULL_JOBS_TABLE = "pull_jobs"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def active_key(model: str, init: bool) -> str:
    """What makes two unfinished jobs the same job: a plain pull joins any pull of the model, a pull
    with `init` only one that also loads it (it waits for the other, then finds the files)."""
    return f"{model} init" if init else model


def iso_utc(value: datetime) -> str:
    """ISO-8601 in UTC with a Z; a naive value (a database without time zones) is UTC already."""
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return aware.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class PullJob(SQLModel, table=True):
    __tablename__ = PULL_JOBS_TABLE

    id: str = Field(default_factory=lambda: str(uuid.uuid4()), primary_key=True)
    model: str = Field(index=True)  # canonical name: repo id, plus ":revision" when not the default
    revision: str | None = None
    quantize: str = "auto"
    init: bool = False
    status: str = Field(default="queued", index=True)  # a JobStatus
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None  # when the latest attempt began downloading
    finished_at: datetime | None = None
    local_path: str | None = None  # the snapshot folder, once complete
    preferred_quantized: bool | None = None  # would the quantize policy load it 4-bit?
    error: str | None = Field(default=None, sa_type=Text)
    completed_bytes: int = Field(default=0, sa_type=BigInteger)
    total_bytes: int | None = Field(default=None, sa_type=BigInteger)
    attempts: int = 0  # times a download started; above 1 after a restart resumed the job
    note: str | None = Field(default=None, sa_type=Text)  # e.g. that a restart resumed the job
    loaded: bool | None = None  # init only: did the load succeed
    quantization: str | None = None  # init only: the precision it loaded in (nf4, bf16, ...)
    load_error: str | None = Field(default=None, sa_type=Text)
    # Replicas sharing the database (see jobs/store.py). The unique keys are NULL once they no longer
    # apply, and NULLs never collide: the database itself keeps one active job per model (and init
    # flag) and one download per repository folder, whichever replica asks.
    repo_id: str = Field(default="", index=True)
    active_key: str | None = Field(default=None, unique=True)  # set while queued or running
    repo_lock: str | None = Field(default=None, unique=True)  # the repo id, while its files download
    owner: str | None = None  # the replica running it (or that last ran it)
    lease_expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))

    def public(self) -> dict[str, Any]:
        """The job as the API shows it: every field, datetimes as ISO-8601 UTC with a Z."""
        return {k: iso_utc(v) if isinstance(v, datetime) else v for k, v in self.model_dump().items()}
