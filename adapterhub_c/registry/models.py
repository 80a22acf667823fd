"""SQLAlchemy models of the registry.

Every object (base, variant, artefact) has a 32-hex id; names are unique within each
table, and lookups accept a name or an id prefix. Files are stored as blob digests
(``files`` maps a relative path to a sha256); a row is only written once all its blobs
are complete, so a row never points at a partial blob.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """A fresh 32-hex identifier."""
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    """Now, in UTC, as a naive datetime (how every timestamp column stores it)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class BaseModel(Base):
    """A base model: built-in, or a Hub repo (a reference until its weights are fetched)."""

    __tablename__ = "base_models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    hub_id: Mapped[str | None] = mapped_column(String(300), index=True)
    revision: Mapped[str | None] = mapped_column(String(200))
    commit_sha: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(100))
    params: Mapped[int | None] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run_id: Mapped[str | None] = mapped_column(String(32))

    @property
    def is_reference(self) -> bool:
        """True while only the name is known (no weights stored)."""
        return not self.files

    @property
    def stored_bytes(self) -> int | None:
        """What the base's weights take in the blob store."""
        return self.size_bytes

    @property
    def loaded_bytes(self) -> int | None:
        """What the loaded base holds in memory: its weights as stored (a GGUF base: dequantized, 4 bytes
        per parameter)."""
        if self.params and any(rel.endswith(".gguf") for rel in (self.files or {})):
            return 4 * self.params
        return self.size_bytes


class Variant(Base):
    """A base compressed by a recipe; the same recipe on the same base is one variant."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("base_id", "recipe_digest"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    base_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    recipe: Mapped[str] = mapped_column(Text)
    recipe_digest: Mapped[str] = mapped_column(String(64))
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sparsity: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run_id: Mapped[str | None] = mapped_column(String(32))

    # Sizes, each named for what it measures (``size_bytes`` is what the row references: the
    # base's shared weight blobs included, so a masked variant "is" bigger than its base there).
    @property
    def stored_bytes(self) -> int | None:
        """What the variant adds to the blob store: its blobs not shared with the base."""
        return (self.stats or {}).get("own_bytes", self.size_bytes)

    @property
    def loaded_bytes(self) -> int | None:
        """What the loaded variant holds in memory (quantized formats + the rest in the compute dtype)."""
        return (self.stats or {}).get("quantized_bytes")


class Artifact(Base):
    """Anything derived or pulled: lora, recovered-lora, prompt, pack, merged, composed."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    base_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    variant_id: Mapped[str | None] = mapped_column(ForeignKey("variants.id"))
    source: Mapped[str | None] = mapped_column(String(500))
    source_sha: Mapped[str | None] = mapped_column(String(64))
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run_id: Mapped[str | None] = mapped_column(String(32))

    @property
    def stored_bytes(self) -> int | None:
        """What the artefact's own files take in the blob store."""
        return self.size_bytes


class Lineage(Base):
    """An edge parent → child (ids of bases, variants or artefacts) with a role."""

    __tablename__ = "lineage"
    __table_args__ = (UniqueConstraint("parent_id", "child_id", "role"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    parent_id: Mapped[str] = mapped_column(String(32), index=True)
    parent_type: Mapped[str] = mapped_column(String(20))
    child_id: Mapped[str] = mapped_column(String(32), index=True)
    child_type: Mapped[str] = mapped_column(String(20))
    role: Mapped[str] = mapped_column(String(40))


class Run(Base):
    """One command that changed the registry: parameters, status, timings, output."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    command: Mapped[str] = mapped_column(String(100))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))


class Evaluation(Base):
    """A measured value: (artefact and/or variant, or base) × dataset × split × metric."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    variant_id: Mapped[str | None] = mapped_column(ForeignKey("variants.id"))
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    prompt_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    dataset: Mapped[str] = mapped_column(String(300))
    split: Mapped[str] = mapped_column(String(40))
    metric: Mapped[str] = mapped_column(String(40))
    value: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Batch(Base):
    """A named batch of work items (e.g. many Hub LoRAs converted to one variant).

    ``params`` holds the pipeline options that define the batch (variant, steps, their
    options): re-running the same name with other options is refused. Run-time settings
    (workers, executor, lease) are not part of it.
    """

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    command: Mapped[str] = mapped_column(String(40))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run_id: Mapped[str | None] = mapped_column(String(32))


class BatchItem(Base):
    """One unit of a batch: its source, state (queued, running, done, failed) and lease.

    A worker owns a running item while ``lease_expires_at`` is in the future; it renews the
    lease as it works. ``attempts`` doubles as the claim token: a worker whose lease was
    taken over can no longer record anything for the item.
    """

    __tablename__ = "batch_items"
    __table_args__ = (UniqueConstraint("batch_id", "position"),
                      Index("ix_batch_items_batch_state", "batch_id", "state"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    position: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(20), default="queued")
    retryable: Mapped[bool] = mapped_column(Boolean, default=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_ids: Mapped[list[Any]] = mapped_column(default=list)
    run_id: Mapped[str | None] = mapped_column(String(32))
