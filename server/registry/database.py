"""The registry database: engine construction, schema migration (Alembic) and the session factory and revision
counter that the targets store, the job queue and the audit log share, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.registry.models import RegistryStateRow

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(url: str) -> Engine:
    """An engine tuned per backend: SQLite in WAL mode so several replicas can share one file safely.

    ``hide_parameters``: a database error's message otherwise quotes the statement's values, and those are target
    contents or audited prompts, which must never reach the logs.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, hide_parameters=True,
                               connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        return engine
    return create_engine(url, hide_parameters=True, pool_pre_ping=True, pool_size=5, max_overflow=5)


def upgrade_database(engine: Engine) -> None:
    """Bring the schema to the newest migration; safe to call from every replica at start."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    logger.info("registry.migrated", extra={"backend": engine.dialect.name})


def utcnow() -> datetime:
    """Naive UTC: stored alike by SQLite and PostgreSQL, so comparisons never mix aware and naive values."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def read_revision(session: Session) -> int:
    return session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0


def bump_revision(session: Session) -> int:
    """Count one change that serving replicas must see; in the caller's transaction, so it commits with the change."""
    session.execute(update(RegistryStateRow).where(RegistryStateRow.id == 1)
                    .values(revision=RegistryStateRow.revision + 1))
    return read_revision(session)


class RegistryDatabase:
    """One engine and one session factory, shared by the targets store, the job queue and the audit log."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def session(self) -> Session:
        """A session for reads (use it as a context manager)."""
        return self._sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on exit, or rolls back entirely if the block raises."""
        with self._sessions.begin() as session:
            yield session
