"""Database tables of the registry (SQLAlchemy 2). Schema changes go through Alembic (``migrations/``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RegistryStateRow(Base):
    """One row: the registry revision, bumped by every change that serving replicas must see."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class TargetRow(Base):
    __tablename__ = "targets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    aliases: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    forget: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    retain: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    # {"eco": {"options": {...}, "status": "preparing|ready|failed", "error": str|None, "artifacts": {...}}, ...}
    mechanisms: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    # {"status": ..., "artifact": sha256, "threshold": .., "false_positive_rate": .., "heldout_recall": ..}
    classifier: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    revision: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    # The erasure or takedown request the target answers (``records.RequestMetadata``); all optional. The requester is
    # personal data: it goes with the row and is never copied to the tombstone, the trail or a log line.
    request_reference: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    request_requester: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_legal_basis: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    request_received_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True, index=True)
    request_effective_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    request_notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The last finished verification run of the target's erasure report (``server/verification/``): figures only,
    # never a probe or a reply; its ``summary`` goes to the tombstone when the target is deleted.
    verification: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    target_id: Mapped[str | None] = mapped_column(
        String(40), ForeignKey("targets.id", ondelete="SET NULL"), nullable=True, index=True
    )
    kind: Mapped[str] = mapped_column(String(40), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    worker: Mapped[str | None] = mapped_column(String(120), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(80), nullable=False, index=True)
    created: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    endpoint: Mapped[str] = mapped_column(String(40), nullable=False)
    targets: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    mechanisms: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    scores: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False)
    outcome: Mapped[str] = mapped_column(String(20), nullable=False, default="served")
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)


class NegativeRow(Base):
    """A sample of the operators' own traffic that no target is about: the gate's calibration keeps it unflagged."""

    __tablename__ = "negatives"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False, index=True)


class ReplicaRow(Base):
    """A serving replica and the registry revision its live snapshot is at, reported every few seconds: the erasure
    pass purges a deleted target's artifacts only once no live replica can still serve a snapshot that uses them."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    serving_revision: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    last_seen: Mapped[datetime] = mapped_column(DateTime(), nullable=False, index=True)


class TombstoneRow(Base):
    """What remains of a deleted target: its id, when and at which revision it was deleted, when everything else of it
    was purged, and the non-identifying part of the request it answered (reference, legal basis, dates), the
    mechanisms that enforced it and the summary figures of its last verification. Deliberately no name, alias, text,
    requester or notes."""

    __tablename__ = "tombstones"

    target_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True, index=True)
    registered_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    reference: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    legal_basis: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    received_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    effective_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    mechanisms: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    verification: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class AdminActionRow(Base):
    """One admin action (the admin trail): who (a key id, never a key), what, on which target or object, when, and
    the names of the fields it set, never their values. Append-only: the migration refuses updates and deletes."""

    __tablename__ = "admin_actions"
    __table_args__ = (Index("ix_admin_actions_target", "target_id", "id"),
                      Index("ix_admin_actions_actor", "actor", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(), nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(40), nullable=False)
    action: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    target_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    subject_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # a negative's or an admin key's id
    fields: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    count: Mapped[int | None] = mapped_column(Integer, nullable=True)  # how many objects (negatives added)
    revision: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the registry revision the action made


class AdminKeyRow(Base):
    """A named admin key kept in the registry, so every replica sees its revocation at once. Only the SHA-256 of the
    key is stored; revoked keys stay (revoked_at set) so that the trail's actors stay resolvable and ids unique."""

    __tablename__ = "admin_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    created_by: Mapped[str] = mapped_column(String(40), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(40), nullable=True)


class ConsoleSessionRow(Base):
    """A web console session (``server/console/``): the admin key id it was opened with (never the key), its CSRF
    token and expiry. Only the SHA-256 of the session token is stored, so a read of the database opens no session;
    kept in the registry so that every replica behind a load balancer knows it and a logout holds everywhere."""

    __tablename__ = "console_sessions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), nullable=False)
    csrf: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False, index=True)
