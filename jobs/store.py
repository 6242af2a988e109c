"""Where pull jobs live: SQLite in the data folder by default, any SQLAlchemy URL via DATABASE_URL.

Every call opens its own short session, so the event loop (through asyncio.to_thread) and the
download threads can write concurrently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel, col, create_engine, select

from jobs.models import UNFINISHED, PullJob


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        connect_args["check_same_thread"] = False  # sessions are used from worker threads
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url, connect_args=connect_args, pool_pre_ping=True)


class JobStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        SQLModel.metadata.create_all(self.engine, tables=[PullJob.__table__])  # type: ignore[list-item]

    def add(self, job: PullJob) -> PullJob:
        with Session(self.engine, expire_on_commit=False) as session:
            session.add(job)
            session.commit()
            return job

    def get(self, job_id: str) -> PullJob | None:
        with Session(self.engine) as session:
            return session.get(PullJob, job_id)

    def newest_first(self) -> list[PullJob]:
        with Session(self.engine) as session:
            return list(session.exec(select(PullJob).order_by(col(PullJob.created_at).desc())))

    def unfinished(self) -> list[PullJob]:
        """Jobs queued or running, oldest first: what a restart must pick up again."""
        with Session(self.engine) as session:
            query = select(PullJob).where(col(PullJob.status).in_(UNFINISHED)).order_by(col(PullJob.created_at))
            return list(session.exec(query))

    def update(self, job_id: str, **fields: Any) -> PullJob:
        with Session(self.engine, expire_on_commit=False) as session:
            job = session.get(PullJob, job_id)
            if job is None:
                raise KeyError(job_id)
            for key, value in fields.items():
                setattr(job, key, value)
            session.commit()
            return job

    def close(self) -> None:
        self.engine.dispose()
