"""Presets (Ollama's `POST /api/create`): the table and its store, in the job database.

A preset is a named model made of a pulled model (`base`) and settings of its own: a system prompt,
a conversation to start from, default options, a chat template, an adapter, a precision. It has no
files: deleting it never touches the base's. Kept in the job database, so every replica sharing
DATABASE_URL serves the same presets, and they survive restarts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Engine, Text
from sqlmodel import Field, Session, SQLModel, col, select

from jobs.models import utcnow
from jobs.store import create_tables


class Preset(SQLModel, table=True):
    __tablename__ = "presets"

    name: str = Field(primary_key=True)  # canonical model name (runners.names.ModelRef.name)
    base: str  # canonical name of the pulled model it runs on (never another preset: flattened at create)
    system: str | None = Field(default=None, sa_type=Text)
    template: str | None = Field(default=None, sa_type=Text)  # a Jinja chat template replacing the base's
    parameters: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # Ollama options, as given
    # The same options, validated at create time, as runners.base.SamplingOptions fields, and num_ctx.
    options: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    num_ctx: int | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)  # prepended to every chat
    adapters: list[str] = Field(default_factory=list, sa_type=JSON)  # adapter model names (at most one)
    quantize: str | None = None  # a runners.quantization.QuantizeRequest; None: the base's own policy
    license: list[str] = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow)
    modified_at: datetime = Field(default_factory=utcnow)


class PresetStore:
    """Short sessions per call (run them in a thread), on the engine the job store made."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        create_tables(self.engine, [SQLModel.metadata.tables[Preset.__tablename__]])

    def get(self, name: str) -> Preset | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Preset, name)

    def list(self) -> list[Preset]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.exec(select(Preset).order_by(col(Preset.name))))

    def put(self, preset: Preset) -> Preset:
        """Create or replace the preset named `preset.name` (Ollama's create overwrites)."""
        with Session(self.engine, expire_on_commit=False) as session:
            existing = session.get(Preset, preset.name)
            if existing is not None:
                preset.created_at = existing.created_at
                session.delete(existing)
                session.flush()
            preset.modified_at = utcnow()
            session.add(preset)
            session.commit()
            return preset

    def delete(self, name: str) -> bool:
        """Whether there was such a preset."""
        with Session(self.engine) as session:
            row = session.get(Preset, name)
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return True
