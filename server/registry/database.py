"""The registry database: engine construction, schema migration (Alembic) and the session factory and revision
counter that the targets store, the job queue and the audit log share, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import fcntl
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, select, text, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from server.registry.models import RegistryStateRow

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 10
SECURE_VACUUMED = 1  # SQLite ``user_version`` once the file was vacuumed with ``secure_delete`` on
# PostgreSQL tables whose deleted or updated rows held a target's text: rewritten (small), or vacuumed (large).
REWRITTEN_TABLES = ("targets", "jobs")
VACUUMED_TABLES = ("audit",)
POSTGRES_VACUUM_LOCK_TIMEOUT = "5s"  # a full vacuum waits no longer for its lock (else retried at the next pass)
MIGRATION_LOCK_KEY = 0x6C657468_656D6967  # PostgreSQL advisory lock key of the migrations ("lethemig" in ASCII)
UNREACHABLE_ERRORS = (OperationalError, InterfaceError, PoolTimeout)
"""What SQLAlchemy raises when the database is down or unreachable (refused, timed out, connection lost, pool
exhausted), as opposed to a query it answered with an error."""


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
            # Deleted rows are overwritten with zeros, not left in free pages (a deleted target's text).
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        return engine
    # A database that stops answering must fail a request within seconds (an admin 503), not hang it.
    return create_engine(url, hide_parameters=True, pool_pre_ping=True, pool_size=5, max_overflow=5,
                         pool_timeout=POOL_TIMEOUT_S, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def upgrade_database(engine: Engine) -> str | None:
    """Bring the schema to the newest migration and return its revision; safe to call from every replica at once.

    Replicas that start together take turns: on PostgreSQL under a session-level advisory lock held on the migrating
    connection, on SQLite under an exclusive ``flock`` of ``<database file>.migrate.lock`` (an in-memory database has
    no other user). Whoever comes second finds the schema at head and has nothing to do.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _migration_lock(engine) as connection:
        with connection.begin():
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        revision = MigrationContext.configure(connection).get_current_revision()
        connection.commit()
    logger.info("registry.migrated", extra={"backend": engine.dialect.name, "schema_revision": revision})
    return revision


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection held alone, among every process migrating this database, until the block ends."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
            try:
                yield connection
            finally:
                if not connection.invalidated:  # a lost connection's session, and its lock, are gone already
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    connection.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        with engine.connect() as connection:
            yield connection
        return
    with open(f"{database}.migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        with engine.connect() as connection:
            yield connection


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

    def scrub(self) -> bool:
        """Erase from the database files what deleted rows left behind; True when done (else retry later).

        SQLite: rows deleted under ``secure_delete`` are zeroed in the main file, but the write-ahead log still holds
        every page version written since its last reset, the deleted text included: a TRUNCATE checkpoint copies the
        current pages back and empties it. It fails (busy) while another connection reads an older snapshot. A file
        that may predate ``secure_delete`` is vacuumed once (rebuilt without any free space), then marked by
        ``user_version``. PostgreSQL: a deleted or updated row's bytes stay in the table's and its indexes' files
        after VACUUM reclaims the space, until new rows overwrite them; VACUUM FULL rewrites the files without them.
        The small tables that held a target's contents (targets, jobs) are rewritten so, under a lock timeout (a
        full vacuum blocks their readers); the audit table, large and written all the time, only gets a plain VACUUM
        (docs/security.md says what remains). ANALYZE refreshes the statistics, which sample column values.
        """
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if self.backend == "sqlite":
                if connection.exec_driver_sql("PRAGMA user_version").scalar() < SECURE_VACUUMED:
                    connection.exec_driver_sql("VACUUM")
                    connection.exec_driver_sql(f"PRAGMA user_version={SECURE_VACUUMED}")
                    logger.info("registry.vacuumed", extra={"backend": self.backend})
                busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
                return busy == 0
            if self.backend == "postgresql":
                connection.exec_driver_sql(f"SET lock_timeout = '{POSTGRES_VACUUM_LOCK_TIMEOUT}'")
                connection.exec_driver_sql(f"VACUUM (FULL, ANALYZE) {', '.join(REWRITTEN_TABLES)}")
                connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(VACUUMED_TABLES)}")
            return True

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on exit, or rolls back entirely if the block raises.

        On SQLite the transaction takes the write lock when it begins (``BEGIN IMMEDIATE``). pysqlite otherwise begins
        it at the first write, so what the block read before could change under it: two job-recovery passes (two lanes
        of one worker) both read a stale job as running, the first requeued it and a worker claimed it again, and the
        second then requeued the new claim as well, which ran the job a third time. PostgreSQL gets the same guarantee
        from the ``SELECT ... FOR UPDATE`` of the blocks that read before they write.
        """
        with self._sessions.begin() as session:
            if self.backend == "sqlite":
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session
