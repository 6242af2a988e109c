"""Where pull jobs live, and how replicas sharing that database divide them.

SQLite in the data folder by default, any SQLAlchemy URL via DATABASE_URL (PostgreSQL through
`postgresql+psycopg://` when replicas run on several hosts). Every call opens its own short session,
so the event loop (through asyncio.to_thread) and the download threads can write concurrently.

Replicas coordinate only through the job rows:
- a replica claims a job with one conditional `UPDATE … WHERE id = (SELECT … LIMIT 1) RETURNING`:
  the job must be queued, or running under a lease that expired (its owner died or stalled). On
  PostgreSQL the inner SELECT takes `FOR UPDATE SKIP LOCKED`, so replicas claiming together never
  wait on or take the same row; on SQLite the statement is atomic by itself;
- unique indexes on `active_key` and `repo_lock` keep one unfinished job per model and one download
  per repository folder, whichever replica asks (a claim that would break one fails and is retried);
- every write to a running job names its owner: a replica whose lease was taken over finds out from
  a write that matched nothing, and stops touching the job and its files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, event, exists, inspect, literal, or_, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import aliased
from sqlmodel import Session, SQLModel, col, create_engine, delete, func, select

from jobs.models import PULL_JOBS_TABLE, UNFINISHED, PullJob, active_key, utcnow
from runners.names import parse_model_name

FINISHED = ("succeeded", "failed", "cancelled")
_SCHEMA_LOCK_KEY = 0x61695F6A6F6273  # pg_advisory_xact_lock key: "ai_jobs"
_SQLITE_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another process's transaction


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # an unreachable server fails readiness in seconds instead of a TCP timeout
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # sessions are used from worker threads; several processes may share the file (replicas on a host)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT})

    @event.listens_for(engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        # WAL: readers never block the writer, so one replica's progress writes do not stall the others.
        if parsed.database and parsed.database != ":memory:":
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

    return engine


def create_tables(engine: Engine, tables: list[Any], then: Callable[[Connection], None] | None = None) -> None:
    """Create `tables` where missing (then run `then` in the same transaction); safe when several
    replicas start together.

    PostgreSQL serializes the creators with a transaction-scoped advisory lock (without it, two
    concurrent CREATE TABLEs fail with UniqueViolation); SQLite's creators retry the loser.
    """
    for attempt in range(6):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                SQLModel.metadata.create_all(conn, tables=tables)
                if then is not None:
                    then(conn)
            return
        except (OperationalError, IntegrityError, ProgrammingError):
            if attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._postgres = self.engine.dialect.name == "postgresql"

    # -- schema ------------------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Create (or bring up to date) the table; safe when several replicas start together."""
        create_tables(self.engine, [SQLModel.metadata.tables[PULL_JOBS_TABLE]], then=_add_missing_columns)

    def ping(self) -> None:
        """Raise unless the database answers (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- submitting and reading ---------------------------------------------------------------------
    def add_or_join(self, job: PullJob, joinable: list[str]) -> PullJob:
        """Insert `job` as queued, unless an unfinished job under one of the `joinable` keys exists:
        then that job is returned. A replica inserting the same model at the same moment loses on the
        unique `active_key` and joins the winner."""
        fields = job.model_dump()
        for _ in range(5):
            with Session(self.engine, expire_on_commit=False) as session:
                existing = session.exec(
                    select(PullJob).where(col(PullJob.active_key).in_(joinable)).order_by(col(PullJob.created_at))
                ).first()
                if existing is not None:
                    return existing
                fresh = PullJob(**fields)
                session.add(fresh)
                try:
                    session.commit()
                    return fresh
                except IntegrityError:
                    session.rollback()  # another replica inserted it first: join that one
        raise RuntimeError(f"could not insert or join a pull job for {job.model}")

    def get(self, job_id: str) -> PullJob | None:
        with Session(self.engine) as session:
            return session.get(PullJob, job_id)

    def page(self, limit: int, offset: int) -> tuple[list[PullJob], int]:
        """Newest first: `limit` jobs after skipping `offset`, and how many jobs there are in all."""
        with Session(self.engine) as session:
            query = (
                select(PullJob).order_by(col(PullJob.created_at).desc(), col(PullJob.id)).offset(offset).limit(limit)
            )
            total = session.exec(select(func.count()).select_from(PullJob)).one()
            return list(session.exec(query)), total

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        with Session(self.engine) as session:
            rows = session.exec(select(PullJob.id, PullJob.status).where(col(PullJob.id).in_(job_ids)))
            return {job_id: status for job_id, status in rows}

    def purge_finished(self, older_than_seconds: float) -> int:
        """Delete finished jobs that finished more than `older_than_seconds` ago (the retention)."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with Session(self.engine) as session:
            result = session.exec(
                delete(PullJob).where(col(PullJob.status).in_(FINISHED), col(PullJob.finished_at) < cutoff)
            )
            session.commit()
            return int(result.rowcount or 0)

    # -- owning jobs ---------------------------------------------------------------------------------
    def claim(self, owner: str, lease_seconds: float) -> PullJob | None:
        """Take the oldest job that is queued, or running under an expired lease; None if there is none.

        A job waits while another job holds its repository's `repo_lock` (one download per folder).
        """
        now = utcnow()
        candidate, other = aliased(PullJob, name="candidate"), aliased(PullJob, name="other")
        busy_repo = exists().where(col(other.repo_lock) == col(candidate.repo_id), col(other.id) != col(candidate.id))
        pick = (
            select(candidate.id).where(_claimable(candidate, now), ~busy_repo).order_by(candidate.created_at).limit(1)
        )
        if self._postgres:
            pick = pick.with_for_update(skip_locked=True, of=candidate)
        takeover_note = (
            literal("resumed: the replica running it (") + col(PullJob.owner) + literal(") stopped renewing its lease")
        )
        claim = (
            update(PullJob)
            .where(col(PullJob.id) == pick.scalar_subquery(), _claimable(PullJob, now))
            .values(
                status="running",
                owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                repo_lock=PullJob.repo_id,
                attempts=col(PullJob.attempts) + 1,
                started_at=now,
                note=_note_on_claim(takeover_note),
            )
            .returning(col(PullJob.id))
        )
        try:
            with self.engine.begin() as conn:
                claimed = conn.execute(claim).scalar_one_or_none()
        except (IntegrityError, OperationalError):
            return None  # another replica took this repo's lock (or held the SQLite file): next round
        return self.get(claimed) if claimed is not None else None

    def renew(self, owner: str, job_ids: list[str], lease_seconds: float) -> set[str]:
        """Extend the leases of `owner`'s running jobs; returns the ids it still owns."""
        if not job_ids:
            return set()
        stmt = (
            update(PullJob)
            .where(col(PullJob.id).in_(job_ids), col(PullJob.owner) == owner, col(PullJob.status) == "running")
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            .returning(col(PullJob.id))
        )
        with self.engine.begin() as conn:
            return set(conn.execute(stmt).scalars())

    def update_owned(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Write fields of a running job that `owner` still holds; False when it lost the job."""
        stmt = (
            update(PullJob)
            .where(col(PullJob.id) == job_id, col(PullJob.owner) == owner, col(PullJob.status) == "running")
            .values(**fields)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def finish(self, job_id: str, owner: str, status: str, **fields: Any) -> bool:
        """End `owner`'s job: its keys are freed, so the next pull of the model makes a new job."""
        fields.setdefault("error", None)  # a success clears what an earlier attempt left
        return self.update_owned(
            job_id,
            owner,
            status=status,
            finished_at=utcnow(),
            active_key=None,
            repo_lock=None,
            lease_expires_at=None,
            **fields,
        )

    def hand_back(self, owner: str) -> int:
        """A graceful stop: `owner`'s running jobs go back to the queue for any replica to take."""
        stmt = (
            update(PullJob)
            .where(col(PullJob.owner) == owner, col(PullJob.status) == "running")
            .values(
                status="queued",
                lease_expires_at=None,
                repo_lock=None,
                note=f"resumed: handed back by replica {owner} when it stopped",
            )
        )
        with self.engine.begin() as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()


def _claimable(job: Any, now: Any) -> Any:
    return or_(job.status == "queued", (job.status == "running") & (job.lease_expires_at < now))


def _note_on_claim(takeover_note: Any) -> Any:
    """Taking over a running job says so in its note; claiming a queued one keeps its note."""
    return case((col(PullJob.status) == "running", takeover_note), else_=col(PullJob.note))


def _add_missing_columns(conn: Connection) -> None:
    """Bring a job table made by an older version up to date: add new columns (nullable) and
    indexes, and fill the replica keys of the jobs it left unfinished."""
    table = SQLModel.metadata.tables[PULL_JOBS_TABLE]
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    missing = [c for c in table.columns if c.name not in present]
    for column in missing:
        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"))
    if not missing:
        return
    for index in table.indexes:
        index.create(conn, checkfirst=True)
    rows = conn.execute(select(PullJob.id, PullJob.model, PullJob.status, PullJob.init)).all()
    for job_id, model, status, init in rows:
        values: dict[str, Any] = {"repo_id": parse_model_name(model).repo_id}
        if status in UNFINISHED:
            values.update(status="queued", active_key=active_key(model, bool(init)))
        conn.execute(update(PullJob).where(col(PullJob.id) == job_id).values(**values))
