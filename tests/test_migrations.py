"""Schema migrations: replicas that start together on a fresh database take turns (PostgreSQL's advisory lock, a file
lock on SQLite), so every one starts and each migration runs once; `lethe migrate` does the same as one step."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import text

from server.registry.database import MIGRATIONS_DIR, make_engine, upgrade_database

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 4
HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
MIGRATIONS = len(list(ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()))


class Upgrades(logging.Handler):
    """Collects Alembic's "Running upgrade A -> B" lines: the migrations this process ran."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ran: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Running upgrade"):
            self.ran.append(record.getMessage())


def start_replica(url: str, barrier, results) -> None:
    """One replica's start, as far as the schema goes (run in a spawned process)."""
    upgrades = Upgrades()
    alembic_log = logging.getLogger("alembic.runtime.migration")
    alembic_log.setLevel(logging.INFO)
    alembic_log.addHandler(upgrades)
    engine = make_engine(url)
    barrier.wait()  # every replica at once
    try:
        revision = upgrade_database(engine)
    except Exception as exc:
        results.put((os.getpid(), None, [], f"{type(exc).__name__}: {exc}"))
        return
    results.put((os.getpid(), revision, upgrades.ran, None))


def start_together(url: str) -> list[tuple]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(REPLICAS), context.Queue()
    replicas = [context.Process(target=start_replica, args=(url, barrier, results)) for _ in range(REPLICAS)]
    for replica in replicas:
        replica.start()
    outcomes = [results.get(timeout=120) for _ in replicas]
    for replica in replicas:
        replica.join(timeout=30)
    assert [replica.exitcode for replica in replicas] == [0] * REPLICAS
    return outcomes


def schema_rows(url: str) -> tuple[list[str], int]:
    """(the recorded schema revisions, the rows of the revision counter): one each when migrated once."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            versions = list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
            counters = connection.execute(text("SELECT count(*) FROM registry_state")).scalar_one()
    finally:
        engine.dispose()
    return versions, counters


def test_replicas_starting_together_on_a_fresh_database_all_start_and_migrate_it_once(database_url: str) -> None:
    outcomes = start_together(database_url)
    assert [error for _, _, _, error in outcomes] == [None] * REPLICAS
    assert {revision for _, revision, _, _ in outcomes} == {HEAD}
    ran = [line for _, _, lines, _ in outcomes for line in lines]
    assert len(ran) == MIGRATIONS, ran  # each migration ran in one replica only; the others found the schema at head
    assert schema_rows(database_url) == ([HEAD], 1)


def test_an_in_memory_sqlite_database_migrates_without_a_lock_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert upgrade_database(make_engine("sqlite://")) == HEAD
    assert list(tmp_path.iterdir()) == []


def lethe_migrate(url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LETHE_DATABASE_URL": url, "LETHE_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "cli", "migrate"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_lethe_migrate_brings_a_fresh_database_to_head_prints_the_revision_and_exits_0(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    first = lethe_migrate(url, tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"revision {HEAD}" in first.stdout
    again = lethe_migrate(url, tmp_path)  # nothing left to do: the same answer
    assert again.returncode == 0 and f"revision {HEAD}" in again.stdout, again.stderr
    assert schema_rows(url) == ([HEAD], 1)


def test_lethe_migrate_exits_non_zero_with_one_line_when_the_database_is_unreachable(tmp_path: Path) -> None:
    result = lethe_migrate("postgresql+psycopg://nobody@127.0.0.1:1/none", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "lethe: the registry database is unreachable (OperationalError)"
    assert "127.0.0.1" not in result.stderr


def migrate_to(engine, revision: str, downgrade: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if downgrade else command.upgrade)(config, revision)


def test_the_compliance_records_migration_keeps_existing_targets_and_tombstones_and_goes_back(
        database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate_to(engine, "0003")
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO targets (id, name, description, aliases, forget, retain, mechanisms, classifier, status, "
                "revision, created_at, updated_at) VALUES ('tgt_old', 'old', '', '[]', '[]', '[]', '{}', '{}', "
                "'active', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
            connection.execute(text("INSERT INTO tombstones (target_id, revision, deleted_at) "
                                    "VALUES ('tgt_gone', 2, '2026-01-02 00:00:00')"))
        assert upgrade_database(engine) == HEAD
        with engine.connect() as connection:
            target = connection.execute(text("SELECT name, request_reference, request_requester FROM targets")).one()
            tombstone = connection.execute(text("SELECT target_id, reference, mechanisms FROM tombstones")).one()
        assert tuple(target) == ("old", None, None)
        assert (tombstone[0], tombstone[1]) == ("tgt_gone", None)
        assert tombstone[2] in ("[]", [])  # SQLite hands JSON back as text, PostgreSQL parsed
        migrate_to(engine, "0003", downgrade=True)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name FROM targets")).scalar_one() == "old"
        assert upgrade_database(engine) == HEAD
    finally:
        engine.dispose()
