"""``JobQueue``: the registry's preparation jobs (classifier fits, mechanism jobs) and how their outcomes reach targets.

Workers claim, heartbeat, complete or fail jobs here; a completed job's result is published on its target and a
failed one's error decides the target's status, in the same transaction that bumps the registry revision, so replicas
never see a job's outcome without the target that carries it. Every write after the claim is fenced by the claim
(``ClaimedJob``: worker and attempt): a run whose job was requeued by the recovery pass, and perhaps claimed again,
can no longer report, complete or fail it (``server/job_lease.py``). The targets store enqueues and cancels jobs
inside its own transactions through the session-level helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.registry import views
from server.registry.catalog import FIT_CLASSIFIER, VERIFY_ERASURE, MechanismCatalog
from server.registry.database import RegistryDatabase, bump_revision, new_id, utcnow
from server.registry.models import JobRow, TargetRow
from server.registry.records import ClaimedJob, JobRecord
from server.registry.status import derive_statuses, latest_jobs

logger = logging.getLogger(__name__)

OPEN = ("queued", "running")
MAX_ATTEMPTS = 3
MAX_MESSAGE = 2000
DELETED_TARGET = "target deleted"


def _held_by(job: ClaimedJob) -> tuple[Any, ...]:
    """The WHERE clause of a fenced write: the row is still running under this claim's worker and attempt."""
    return (JobRow.id == job.id, JobRow.status == "running", JobRow.worker == job.worker,
            JobRow.attempts == job.attempts)


class JobQueue:
    def __init__(self, database: RegistryDatabase, catalog: MechanismCatalog) -> None:
        self._database = database
        self._catalog = catalog

    # ------------------------------------------------------------ reads

    def get(self, job_id: str) -> JobRecord:
        with self._database.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"No job `{job_id}`.", param="job_id", code="job_not_found")
            return views.job_record(row)

    def open_among(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` are queued or running (their staging folders are still in use)."""
        if not job_ids:
            return set()
        with self._database.session() as session:
            return set(session.scalars(select(JobRow.id).where(JobRow.id.in_(list(job_ids)),
                                                               JobRow.status.in_(OPEN))))

    # ------------------------------------------------------------ workers

    def claim(self, worker: str, kinds: Sequence[str]) -> ClaimedJob | None:
        """Atomically move the oldest queued job to running (SKIP LOCKED on Postgres, a guarded UPDATE on SQLite)."""
        now = utcnow()
        with self._database.transaction() as session:
            query = (select(JobRow).where(JobRow.status == "queued", JobRow.kind.in_(list(kinds)))
                     .order_by(JobRow.created_at, JobRow.id).limit(1).with_for_update(skip_locked=True))
            row = session.scalars(query).first()
            if row is None:
                return None
            claimed = session.execute(
                update(JobRow).where(JobRow.id == row.id, JobRow.status == "queued")
                .values(status="running", worker=worker, started_at=now, heartbeat_at=now,
                        attempts=JobRow.attempts + 1, message="started")
            ).rowcount
            if claimed != 1:
                return None
            session.refresh(row)
            return ClaimedJob(id=row.id, kind=row.kind, target_id=row.target_id, attempts=row.attempts,
                              payload=dict(row.payload), worker=worker)

    def report_progress(self, job: ClaimedJob, progress: float, message: str) -> bool:
        """Record progress and renew the claim's lease (the heartbeat); False if the job is no longer this claim's
        (cancelled, or requeued and perhaps claimed again): the run then stops."""
        with self._database.transaction() as session:
            updated = session.execute(
                update(JobRow).where(*_held_by(job))
                .values(progress=max(0.0, min(1.0, progress)), message=message[:MAX_MESSAGE], heartbeat_at=utcnow())
            ).rowcount
        return updated == 1

    def complete(self, job: ClaimedJob, result: dict[str, Any]) -> bool:
        """Mark the job done and publish its result on the target, bumping the revision for the replicas; False (and
        nothing written) if the claim no longer holds the job.

        A ``fit_classifier`` result becomes the target's classifier; a mechanism job's result is merged into that
        mechanism's published ``state`` (artifact digests, calibrated values: a mechanism may have several jobs, each
        publishing its own keys); a ``verify_erasure`` result becomes the target's last verification (figures only, no
        revision bump: replicas serve nothing of it).

        The fenced UPDATE comes first: on
        PostgreSQL it waits for a concurrent recovery pass and re-checks the claim after it, on SQLite writers are
        serialised, so a result is published only by the run that still holds the job.
        """
        now = utcnow()
        with self._database.transaction() as session:
            finished = session.execute(
                update(JobRow).where(*_held_by(job))
                .values(status="succeeded", progress=1.0, finished_at=now, message="done")
            ).rowcount
            if finished != 1:
                return False
            # Locked: two jobs of one mechanism (GUARD's phrases and its calibration) may finish at once, and each
            # merges its keys into the state the other may just have written.
            target = session.get(TargetRow, job.target_id, with_for_update=True) if job.target_id else None
            if target is not None and job.kind == VERIFY_ERASURE:
                # A measurement, not something replicas serve: stored on the target, no new revision.
                target.verification = result
            elif target is not None:
                mechanism = self._catalog.job_mechanism.get(job.kind)
                if job.kind == FIT_CLASSIFIER:
                    target.classifier = result
                elif mechanism in target.mechanisms:
                    entry = target.mechanisms[mechanism]
                    target.mechanisms = {**target.mechanisms,
                                         mechanism: {**entry, "state": {**(entry.get("state") or {}), **result}}}
                self._republish(session, target, now)
        return True

    def cancel(self, job: ClaimedJob, reason: str) -> bool:
        """Cancel a claimed job (its target is gone); False if the claim no longer holds it."""
        with self._database.transaction() as session:
            return session.execute(update(JobRow).where(*_held_by(job))
                                   .values(status="cancelled", finished_at=utcnow(),
                                           message=reason[:MAX_MESSAGE])).rowcount == 1

    def fail(self, job: ClaimedJob, error: str) -> bool:
        """Requeue the job if attempts remain, otherwise mark it failed; its target then shows ``failed``, or
        ``degraded`` for a classifier fit (``status.derive_statuses``). False if the claim no longer holds it."""
        now = utcnow()
        with self._database.transaction() as session:
            row = session.scalars(select(JobRow).where(*_held_by(job)).with_for_update()).first()
            if row is None:
                return False
            self._fail_or_retry(session, row, error, now)
        return True

    def recover_stale(self, stale_after_s: float) -> int:
        """Jobs whose worker stopped heart-beating (crash, kill -9) are retried or failed, never left running."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        with self._database.transaction() as session:
            stale = session.scalars(select(JobRow).where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
                                    .with_for_update(skip_locked=True)).all()
            for job in stale:
                self._fail_or_retry(session, job, f"worker {job.worker} stopped responding", now)
        if stale:
            logger.warning("jobs.recovered", extra={"count": len(stale)})
        return len(stale)

    # ------------------------------------------------------------ within a targets-store transaction

    def enqueue(self, session: Session, target_id: str, kinds: Sequence[str], now: datetime) -> list[JobRow]:
        rows = []
        for order, kind in enumerate(kinds):  # distinct timestamps: claimed in this order, the classifier first
            rows.append(JobRow(id=new_id("job"), target_id=target_id, kind=kind, status="queued", progress=0.0,
                               message="queued", attempts=0, max_attempts=MAX_ATTEMPTS, payload={},
                               created_at=now + timedelta(microseconds=order)))
        session.add_all(rows)
        return rows

    def cancel_open(self, session: Session, target_id: str, now: datetime, kinds: Sequence[str] | None = None) -> None:
        """Supersede the target's queued and running jobs (all of them, or those of ``kinds``)."""
        query = update(JobRow).where(JobRow.target_id == target_id, JobRow.status.in_(OPEN))
        if kinds is not None:
            query = query.where(JobRow.kind.in_(list(kinds)))
        session.execute(query.values(status="cancelled", finished_at=now, message="superseded"))

    def scrub(self, session: Session, target_id: str) -> None:
        """Blank what the target's jobs recorded (messages, errors, payloads may quote its contents) before the target
        is deleted; the jobs stay, with their status, as ``target deleted``."""
        session.execute(update(JobRow).where(JobRow.target_id == target_id)
                        .values(message=DELETED_TARGET, error=None, payload={}))

    def refresh_statuses(self, session: Session, target: TargetRow) -> None:
        """Re-derive the target's and its mechanisms' statuses (``status.derive_statuses``) from its jobs."""
        jobs = session.scalars(select(JobRow).where(JobRow.target_id == target.id)
                               .order_by(JobRow.created_at, JobRow.id))
        statuses = derive_statuses(target.mechanisms, target.classifier.get("status", "preparing"), latest_jobs(jobs),
                                   self._catalog.implemented, self._catalog.jobs_for,
                                   self._catalog.classifier_fitted_gates)
        target.mechanisms, target.status = statuses.mechanisms, statuses.target

    def jobs_by_target(self, session: Session, target_ids: list[str]) -> dict[str, list[JobRow]]:
        if not target_ids:
            return {}
        rows = session.scalars(select(JobRow).where(JobRow.target_id.in_(target_ids))
                               .order_by(JobRow.created_at, JobRow.id)).all()
        grouped: dict[str, list[JobRow]] = {}
        for row in rows:
            grouped.setdefault(row.target_id or "", []).append(row)
        return grouped

    # ------------------------------------------------------------ helpers

    def _fail_or_retry(self, session: Session, job: JobRow, error: str, now: datetime) -> None:
        if job.attempts < job.max_attempts:
            job.status, job.error, job.worker = "queued", error, None
            job.message = f"retrying after: {error}"[:MAX_MESSAGE]
            return
        job.status, job.error, job.finished_at, job.message = "failed", error, now, "failed"
        target = session.get(TargetRow, job.target_id) if job.target_id else None
        if target is not None:
            if job.kind == FIT_CLASSIFIER and target.classifier.get("status") != "ready":
                target.classifier = {**target.classifier, "status": "failed"}
            self._republish(session, target, now)

    def _republish(self, session: Session, target: TargetRow, now: datetime) -> None:
        """A job outcome changed the target: re-derive its statuses and let the replicas see it."""
        self.refresh_statuses(session, target)
        target.updated_at = now
        target.revision = bump_revision(session)
