"""A running job's lease: its heartbeat survives database errors, a job that cannot renew its lease for longer than
the lease stops, a result whose lease was lost is never committed, and a job past its lease is requeued once however
many recovery passes find it (SQLite and a real PostgreSQL, stopped and restarted mid-job)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError

from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.artifacts import ArtifactStore
from server.jobs import JobCancelled, JobContext, JobWorker
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER
from server.registry.database import make_engine, upgrade_database, utcnow
from server.registry.models import JobRow
from tests.postgres import postgres_available, postgres_server


def open_registry(url: str) -> Registry:
    engine = make_engine(url)
    upgrade_database(engine)
    return Registry.open(engine)


@pytest.fixture
def registry(database_url: str) -> Registry:
    return open_registry(database_url)


def add_target(registry: Registry) -> str:
    body = TargetCreate.model_validate({"name": "t", "aliases": ["Xavier Quill"], "forget": [{"text": "x"}]})
    return registry.targets.create(new_target(body, ["eco"])).id


def job_row(registry: Registry) -> JobRow:
    with registry.database.session() as session:
        return session.scalars(select(JobRow).where(JobRow.kind == FIT_CLASSIFIER)).one()


def failing_first(calls: int, method):
    """``method`` that raises an OperationalError on its first ``calls`` calls, as a database outage would."""
    seen = {"calls": 0}

    def flaky(*args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] <= calls:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
        return method(*args, **kwargs)

    return flaky


def result(artifact: str) -> dict:
    return {"status": "ready", "artifact": artifact * 64, "threshold": 0.5}


def test_the_heartbeat_survives_database_errors_and_keeps_renewing(registry: Registry, tmp_path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    add_target(registry)
    monkeypatch.setattr(registry.jobs, "report_progress", failing_first(3, registry.jobs.report_progress))
    renewed_after_errors = threading.Event()

    def waits_for_a_renewal(context: JobContext) -> dict:
        started = job_row(registry).heartbeat_at
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not renewed_after_errors.is_set():
            if job_row(registry).heartbeat_at > started:
                renewed_after_errors.set()
            time.sleep(0.02)
        return result("a")

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: waits_for_a_renewal}, heartbeat_s=0.05,
                       stale_after_s=5.0)
    assert worker.run_once()
    assert renewed_after_errors.is_set(), "the heartbeat stopped at its first database error"
    assert job_row(registry).status == "succeeded"


def test_a_job_that_cannot_renew_its_lease_for_longer_than_the_lease_stops(registry: Registry, tmp_path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    add_target(registry)
    monkeypatch.setattr(registry.jobs, "report_progress", failing_first(10**6, registry.jobs.report_progress))
    outcome: list[str] = []

    def works_and_reports(context: JobContext) -> dict:
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                context.progress(0.5, "working")  # the database is down: reporting must not fail the job
                time.sleep(0.02)
        except JobCancelled:
            outcome.append("stopped")
            raise
        outcome.append("ran to the end")
        return result("a")

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: works_and_reports}, heartbeat_s=0.05,
                       stale_after_s=0.5)
    started = time.monotonic()
    assert worker.run_once()
    assert outcome == ["stopped"] and time.monotonic() - started < 3
    row = job_row(registry)
    assert row.status == "running" and row.error is None  # left to the recovery pass, as a crashed worker's job
    assert registry.jobs.recover_stale(0.0) == 1 and job_row(registry).status == "queued"


def test_a_result_whose_lease_was_lost_is_not_committed(registry: Registry, tmp_path) -> None:
    target_id = add_target(registry)
    second: list = []

    def loses_its_lease(context: JobContext) -> dict:
        # Its heartbeat stalled past the lease: another worker's recovery pass requeued the job, and it claimed it.
        assert registry.jobs.recover_stale(0.0) == 1
        second.append(registry.jobs.claim("other-worker", [FIT_CLASSIFIER]))
        return result("a")

    first = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: loses_its_lease}, heartbeat_s=60)
    assert first.run_once()
    assert second[0] is not None
    row = job_row(registry)
    assert row.status == "running" and row.worker == "other-worker"  # the first run's result was not committed
    assert "artifact" not in registry.targets.record(target_id).classifier
    assert registry.jobs.complete(second[0], result("b"))
    assert registry.targets.record(target_id).classifier["artifact"] == "b" * 64
    assert job_row(registry).status == "succeeded"


def test_a_stale_claim_can_neither_fail_requeue_nor_report_on_the_new_run(registry: Registry) -> None:
    add_target(registry)
    stale = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    registry.jobs.recover_stale(0.0)
    fresh = registry.jobs.claim("w2", [FIT_CLASSIFIER])
    assert not registry.jobs.report_progress(stale, 0.9, "late")
    assert not registry.jobs.fail(stale, "late failure")
    assert not registry.jobs.complete(stale, result("a"))
    row = job_row(registry)
    assert (row.status, row.worker, row.attempts, row.error) == ("running", "w2", fresh.attempts, row.error)
    assert registry.jobs.report_progress(fresh, 0.5, "half way")


@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not installed")
def test_a_postgres_outage_shorter_than_the_lease_does_not_disturb_a_running_job(tmp_path) -> None:
    with postgres_server() as server:
        registry = open_registry(server.url)
        add_target(registry)
        reports: list[float] = []

        def trains_through_the_outage(context: JobContext) -> dict:
            for step in range(40):
                context.progress(step / 40, f"step {step}")
                reports.append(time.monotonic())
                time.sleep(0.1)
            return result("c")

        outage = threading.Timer(0.5, lambda: (server.stop(), time.sleep(1.5), server.start()))
        worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: trains_through_the_outage},
                           heartbeat_s=0.1, stale_after_s=10.0)
        outage.start()
        assert worker.run_once()
        outage.join()
        assert len(reports) == 40
        row = job_row(registry)
        assert row.status == "succeeded" and row.attempts == 1


def test_two_recovery_passes_never_requeue_a_job_that_the_first_one_requeued_and_a_worker_claimed_again(
        registry: Registry) -> None:
    """The race of one worker's two lanes: pass A reads the stale job, pass B requeues it and a worker claims it, then
    A's write must not requeue that live claim too (which ran the job a third time on SQLite)."""
    add_target(registry)
    registry.jobs.claim("dead-worker", [FIT_CLASSIFIER])
    with registry.database.transaction() as session:
        session.execute(update(JobRow).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    other: dict[str, object] = {}

    def other_lane() -> None:  # its recovery pass, then its claim
        other["recovered"] = registry.jobs.recover_stale(stale_after_s=60)
        other["claim"] = registry.jobs.claim("live-worker", [FIT_CLASSIFIER])

    lane = threading.Thread(target=other_lane)

    def pause_after_reading_the_stale_job(conn, cursor, statement: str, *_) -> None:
        if threading.current_thread() is threading.main_thread() and "heartbeat_at <" in statement \
                and not lane.is_alive() and "recovered" not in other:
            lane.start()
            lane.join(timeout=2.0)  # the other lane runs now, unless this pass's transaction holds it back

    event.listen(registry.database.engine, "after_cursor_execute", pause_after_reading_the_stale_job)
    try:
        first = registry.jobs.recover_stale(stale_after_s=60)
        lane.join(timeout=30)
    finally:
        event.remove(registry.database.engine, "after_cursor_execute", pause_after_reading_the_stale_job)
    assert not lane.is_alive()
    assert first + other["recovered"] == 1  # the job was requeued once
    claims = [claim for claim in (other["claim"], registry.jobs.claim("late-worker", [FIT_CLASSIFIER])) if claim]
    assert [claim.attempts for claim in claims] == [2]  # claimed once more, and that claim still holds the job
    assert registry.jobs.report_progress(claims[0], 0.5, "running")
