"""Stored OpenAI Responses (`store: true`): the table and its store, in the job database.

A row keeps the response as the API shows it and the conversation it ends (its input, history
included, and its output as chat messages), so `previous_response_id` continues a conversation in
any process that shares the database: after a restart, and across replicas with one DATABASE_URL.
Rows older than the retention (RESPONSES_RETENTION) are never read and are deleted as new ones
are written.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, Engine, delete
from sqlmodel import Field, Session, SQLModel, col

from jobs.models import utcnow
from jobs.store import create_tables

STORED_RESPONSES_TABLE = "stored_responses"


class StoredResponse(SQLModel, table=True):
    __tablename__ = STORED_RESPONSES_TABLE

    id: str = Field(primary_key=True)  # resp_...
    model: str
    created_at: datetime = Field(default_factory=utcnow, index=True)
    previous_response_id: str | None = None
    response: dict[str, Any] = Field(sa_type=JSON)  # the response object as GET /v1/responses/{id} shows it
    conversation: list[dict[str, Any]] = Field(sa_type=JSON)  # chat messages up to and including its output
    input_items: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)  # this request's input, as items


class ResponseStore:
    """Short sessions per call (run them in a thread), on the engine the job store made."""

    def __init__(self, engine: Engine, retention_seconds: float) -> None:
        self.engine = engine
        self.retention = timedelta(seconds=retention_seconds)

    def create_schema(self) -> None:
        create_tables(self.engine, [SQLModel.metadata.tables[STORED_RESPONSES_TABLE]])  # replicas starting together

    def _cutoff(self) -> datetime:
        return datetime.now(timezone.utc) - self.retention

    def add(self, row: StoredResponse) -> None:
        """Keep `row`, and drop the rows past retention."""
        with Session(self.engine) as session:
            expired = delete(StoredResponse).where(col(StoredResponse.created_at) < self._cutoff())
            session.exec(expired)
            session.add(row)
            session.commit()

    def get(self, response_id: str) -> StoredResponse | None:
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.get(StoredResponse, response_id)
        if row is None or _aware(row.created_at) < self._cutoff():
            return None
        return row

    def delete(self, response_id: str) -> bool:
        """Whether there was such a response (still within retention) to delete."""
        with Session(self.engine) as session:
            row = session.get(StoredResponse, response_id)
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return _aware(row.created_at) >= self._cutoff()


def _aware(value: datetime) -> datetime:
    """A database without time zones (SQLite) gives naive datetimes; they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
