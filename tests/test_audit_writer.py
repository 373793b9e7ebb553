"""The audit writer survives the database: an outage, a failing prune, a record the database refuses, on SQLite and
on a real PostgreSQL; its buffer stays bounded while it waits."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy.exc import OperationalError

from server import audit as audit_module
from server.audit import AuditWriter
from server.metrics import Metrics
from server.registry import Registry
from server.registry.database import make_engine, upgrade_database
from server.registry.models import AuditRow
from server.registry.records import AuditEntry


@pytest.fixture
def registry(database_url: str) -> Registry:
    engine = make_engine(database_url)
    upgrade_database(engine)
    return Registry.open(engine)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "FLUSH_INTERVAL_S", 0.01)
    monkeypatch.setattr(audit_module, "MAX_BACKOFF_S", 0.05)


def entry(request_id: str, prompt: str | None = None, **overrides) -> AuditEntry:
    fields = dict(request_id=request_id, created=time.time(), endpoint="chat/completions", targets=[],
                  mechanisms=[], scores={}, outcome="served", prompt=prompt)
    return AuditEntry(**{**fields, **overrides})


def stored(registry: Registry) -> dict[str, str | None]:
    return {record.request_id: record.prompt for record in registry.audit.recent(1000, None)}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_failing_prune_does_not_stop_the_writer(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    prunes: list[float] = []

    def broken_prune(older_than: float) -> int:
        prunes.append(older_than)
        raise OperationalError("DELETE FROM audit", {}, Exception("database is locked"))

    monkeypatch.setattr(registry.audit, "prune", broken_prune)
    monkeypatch.setattr(audit_module, "PRUNE_RETRY_S", 0.02)
    metrics = Metrics()
    writer = AuditWriter(registry.audit, retention_days=1, metrics=metrics)

    async def scenario() -> None:
        task = asyncio.create_task(writer.run())
        await until(lambda: len(prunes) >= 2)  # the failed prune is retried, not fatal
        writer.record(entry("chatcmpl-after-prune-failure"))
        await until(lambda: "chatcmpl-after-prune-failure" in stored(registry))
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert sample(metrics, "lethe_background_failures_total", task="audit_prune") >= 2


def test_records_wait_through_an_outage_and_are_written_when_the_database_returns(registry: Registry) -> None:
    AuditRow.__table__.drop(registry.database.engine)  # every write and prune now fails
    metrics = Metrics()
    writer = AuditWriter(registry.audit, retention_days=1, metrics=metrics)

    async def scenario() -> None:
        task = asyncio.create_task(writer.run())
        for i in range(5):
            writer.record(entry(f"chatcmpl-{i}"))
        await until(lambda: sample(metrics, "lethe_background_failures_total", task="audit_write") >= 3)
        assert writer.pending == 5 and not task.done()
        AuditRow.__table__.create(registry.database.engine)  # the database is back
        await until(lambda: writer.pending == 0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert sorted(stored(registry)) == [f"chatcmpl-{i}" for i in range(5)]
    assert sample(metrics, "lethe_audit_dropped_total", reason="rejected") == 0


def test_the_buffer_is_bounded_and_drops_the_oldest_records_counting_them(registry: Registry) -> None:
    AuditRow.__table__.drop(registry.database.engine)
    metrics = Metrics()
    one = audit_module.record_size(entry("chatcmpl-0000", "p" * 100))
    writer = AuditWriter(registry.audit, retention_days=1, buffer_bytes=10 * one, metrics=metrics)
    for i in range(25):
        writer.record(entry(f"chatcmpl-{i:04d}", "p" * 100))
    assert writer.pending == 10 and sample(metrics, "lethe_audit_dropped_total", reason="buffer_full") == 15
    asyncio.run(writer.flush())  # fails: the records are kept, still bounded
    assert writer.pending == 10
    AuditRow.__table__.create(registry.database.engine)
    asyncio.run(writer.flush())
    assert sorted(stored(registry)) == [f"chatcmpl-{i:04d}" for i in range(15, 25)]  # the newest survive
    assert sample(metrics, "lethe_audit_pending_records") == 0


def test_a_prompt_with_nul_or_lone_surrogates_is_stored_sanitised_and_blocks_nothing(registry: Registry) -> None:
    writer = AuditWriter(registry.audit, retention_days=1, metrics=Metrics())
    writer.record(entry("chatcmpl-nul", "before\x00after"))
    writer.record(entry("chatcmpl-surrogate", "half \ud83d pair"))
    writer.record(entry("chatcmpl-plain", "plain"))
    asyncio.run(writer.flush())
    assert stored(registry) == {"chatcmpl-nul": "before\ufffdafter", "chatcmpl-surrogate": "half \ufffd pair",
                                "chatcmpl-plain": "plain"}
    writer.record(entry("chatcmpl-later", "later"))
    asyncio.run(writer.flush())
    assert "chatcmpl-later" in stored(registry) and writer.pending == 0


def test_a_record_the_database_refuses_is_dropped_alone(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    writer = AuditWriter(registry.audit, retention_days=1, metrics=metrics)
    writer.record(entry("chatcmpl-before", "secret prompt before"))
    writer.record(entry("chatcmpl-bad", "secret prompt of the bad one", endpoint=None))  # NOT NULL: refused
    writer.record(entry("chatcmpl-after"))
    with caplog.at_level(logging.INFO, logger="server"):
        asyncio.run(writer.flush())
    assert sorted(stored(registry)) == ["chatcmpl-after", "chatcmpl-before"] and writer.pending == 0
    assert sample(metrics, "lethe_audit_dropped_total", reason="rejected") == 1
    rejected = [r for r in caplog.records if r.getMessage() == "audit.record_rejected"]
    assert [r.request_id for r in rejected] == ["chatcmpl-bad"]
    assert "secret prompt" not in caplog.text  # database errors never carry the prompt into the logs
