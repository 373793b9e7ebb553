"""``RegistryStore``: the one place that reads and writes the registry database.

Every public method is one transaction: a failed create, patch or delete writes nothing. Every change that serving
replicas must see bumps the registry revision in the same transaction, which is what replicas poll for.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.errors import Conflict, NotFound, Unprocessable
from server.registry import views
from server.registry.models import AuditRow, JobRow, RegistryStateRow, TargetRow
from server.registry.records import (
    AuditEntry,
    ClaimedJob,
    DeletedTarget,
    JobRecord,
    NewTarget,
    RegistrySummary,
    TargetChanges,
    TargetListing,
    TargetRecord,
    TargetView,
)
from server.registry.status import derive_statuses, latest_jobs

logger = logging.getLogger(__name__)

FIT_CLASSIFIER = "fit_classifier"
CLASSIFIER_GATED = frozenset({"o3"})  # mechanisms whose gate is fitted with the classifier (see classifier_jobs.py)
MIN_FORGET_SOURCES = 2  # the classifier's threshold is calibrated on held-out sources: it needs two at least


def check_fittable(aliases: Sequence[str], forget: Sequence[Any]) -> None:
    if len(aliases) + len(forget) < MIN_FORGET_SOURCES:
        raise Unprocessable("A target needs at least two forget items, or one item and an alias, so that its "
                            "classifier can be calibrated on held-out data.", param="forget")


def utcnow() -> datetime:
    """Naive UTC: stored alike by SQLite and PostgreSQL, so comparisons never mix aware and naive values."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class MechanismCatalog:
    """What the store needs to know about the mechanisms of this build (see ``guards/registry.py``)."""

    implemented: frozenset[str] = frozenset()
    jobs_for: Callable[[str, Mapping[str, Any]], list[str]] = field(default=lambda name, options: [])
    job_mechanism: Mapping[str, str] = field(default_factory=dict)  # job kind -> the mechanism it prepares
    # (a target's enabled mechanisms, every other target's) -> why the registry cannot take it, or None
    admit: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], str | None] = field(
        default=lambda mechanisms, others: None)


class RegistryStore:
    def __init__(self, engine: Engine, catalog: MechanismCatalog = MechanismCatalog()) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._catalog = catalog

    @property
    def backend(self) -> str:
        return self._engine.dialect.name

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _bump_revision(self, session: Session) -> int:
        session.execute(update(RegistryStateRow).where(RegistryStateRow.id == 1)
                        .values(revision=RegistryStateRow.revision + 1))
        return session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0

    # ------------------------------------------------------------ reads

    def revision(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0

    def list_targets(self) -> TargetListing:
        with self._sessions() as session:
            revision = session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0
            rows = session.scalars(select(TargetRow).order_by(TargetRow.created_at, TargetRow.id)).all()
            jobs = self._jobs_by_target(session, [row.id for row in rows])
            targets = [views.target_view(row, jobs.get(row.id, []), with_contents=False) for row in rows]
        return TargetListing(revision=revision, targets=targets)

    def get_target(self, target_id: str) -> TargetView:
        with self._sessions() as session:
            row = self._target_row(session, target_id)
            jobs = self._jobs_by_target(session, [row.id])
            return views.target_view(row, jobs.get(row.id, []), with_contents=True)

    def target_record(self, target_id: str) -> TargetRecord:
        with self._sessions() as session:
            return views.target_record(self._target_row(session, target_id))

    def snapshot_rows(self) -> tuple[int, list[TargetRecord]]:
        """The revision and every target whose classifier is ready, read consistently in one transaction."""
        with self._transaction() as session:
            revision = session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0
            rows = session.scalars(select(TargetRow).order_by(TargetRow.id)).all()
            return revision, [views.target_record(row) for row in rows if row.classifier.get("status") == "ready"]

    def get_job(self, job_id: str) -> JobRecord:
        with self._sessions() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"No job `{job_id}`.", param="job_id", code="job_not_found")
            return views.job_record(row)

    def summary(self) -> RegistrySummary:
        with self._sessions() as session:
            revision = session.scalar(select(RegistryStateRow.revision).where(RegistryStateRow.id == 1)) or 0
            targets = dict(session.execute(select(TargetRow.status, func.count()).group_by(TargetRow.status)).all())
            jobs = dict(session.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        targets["total"] = sum(targets.values())
        return RegistrySummary(revision=revision, targets=targets, jobs=jobs)

    # ------------------------------------------------------------ writes

    def create_target(self, new: NewTarget) -> TargetView:
        now = utcnow()
        check_fittable(new.aliases, new.forget)
        options = dict(new.mechanisms)
        try:
            with self._transaction() as session:
                if session.scalar(select(TargetRow.id).where(TargetRow.name == new.name)) is not None:
                    raise Conflict(f"A target named `{new.name}` already exists.", param="name")
                self._admit(session, None, options)
                revision = self._bump_revision(session)
                row = TargetRow(
                    id=new_id("tgt"), name=new.name, description=new.description, aliases=list(new.aliases),
                    forget=[dict(item) for item in new.forget], retain=[dict(item) for item in new.retain],
                    mechanisms={name: {"options": opts, "state": {}} for name, opts in options.items()},
                    classifier={"status": "preparing"}, status="preparing", revision=revision, created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
                self._enqueue_preparation(session, row, now, self._preparation_kinds(row))
                self._refresh_statuses(session, row)
        except IntegrityError as exc:  # a concurrent create with the same name won the race
            raise Conflict(f"A target named `{new.name}` already exists.", param="name") from exc
        logger.info("target.created", extra={"target_id": row.id, "revision": revision})
        return self.get_target(row.id)

    def patch_target(self, target_id: str, patch: TargetChanges) -> TargetView:
        now = utcnow()
        with self._transaction() as session:
            row = self._target_row(session, target_id)
            changed_contents = False
            previous_mechanisms = dict(row.mechanisms)
            if patch.description is not None:
                row.description = patch.description
            if patch.aliases is not None:
                row.aliases, changed_contents = list(patch.aliases), True
            if patch.forget is not None:
                row.forget, changed_contents = [dict(item) for item in patch.forget], True
            if patch.retain is not None:
                row.retain, changed_contents = [dict(item) for item in patch.retain], True
            if patch.mechanisms is not None:
                # A mechanism kept across the patch keeps serving its published state until its jobs replace it.
                enabled = dict(patch.mechanisms)
                self._admit(session, row.id, enabled)
                row.mechanisms = {name: {"options": opts, "state": row.mechanisms.get(name, {}).get("state", {})}
                                  for name, opts in enabled.items()}
            check_fittable(row.aliases, row.forget)
            if changed_contents:
                # New contents: everything is refitted; the old classifier and states serve until replaced.
                self._cancel_open_jobs(session, row.id, now)
                self._enqueue_preparation(session, row, now, self._preparation_kinds(row))
            elif patch.mechanisms is not None:
                # Only the mechanisms changed: redo just what their new options need.
                kinds = self._changed_mechanism_kinds(previous_mechanisms, row.mechanisms)
                self._cancel_open_jobs(session, row.id, now, kinds)
                self._enqueue_preparation(session, row, now, kinds)
            if changed_contents or patch.mechanisms is not None:
                self._refresh_statuses(session, row)
            row.revision = self._bump_revision(session)
            row.updated_at = now
        logger.info("target.patched", extra={"target_id": target_id, "refit": changed_contents,
                                             "mechanisms_changed": patch.mechanisms is not None})
        return self.get_target(target_id)

    def delete_target(self, target_id: str) -> DeletedTarget:
        now = utcnow()
        with self._transaction() as session:
            row = self._target_row(session, target_id)
            self._cancel_open_jobs(session, row.id, now)
            session.delete(row)
            revision = self._bump_revision(session)
        logger.info("target.deleted", extra={"target_id": target_id, "revision": revision})
        return DeletedTarget(id=target_id, revision=revision)

    # ------------------------------------------------------------ jobs

    def claim_job(self, worker: str, kinds: Sequence[str]) -> ClaimedJob | None:
        """Atomically move the oldest queued job to running (SKIP LOCKED on Postgres, a guarded UPDATE on SQLite)."""
        now = utcnow()
        with self._transaction() as session:
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
                              payload=dict(row.payload))

    def report_progress(self, job_id: str, progress: float, message: str) -> bool:
        """Record progress and heartbeat; False if the job was cancelled meanwhile (the worker then stops)."""
        with self._transaction() as session:
            updated = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "running")
                .values(progress=max(0.0, min(1.0, progress)), message=message[:2000], heartbeat_at=utcnow())
            ).rowcount
        return updated == 1

    def complete_job(self, job_id: str, result: dict[str, Any]) -> None:
        """Mark the job done and publish its result on the target, bumping the revision for the replicas.

        A ``fit_classifier`` result becomes the target's classifier; a mechanism job's result becomes that
        mechanism's published ``state`` (artifact digests, calibrated values).
        """
        now = utcnow()
        with self._transaction() as session:
            job = session.get(JobRow, job_id)
            if job is None or job.status != "running":
                return
            job.status, job.progress, job.finished_at, job.message = "succeeded", 1.0, now, "done"
            target = session.get(TargetRow, job.target_id) if job.target_id else None
            if target is not None:
                mechanism = self._catalog.job_mechanism.get(job.kind)
                if job.kind == FIT_CLASSIFIER:
                    target.classifier = result
                elif mechanism in target.mechanisms:
                    target.mechanisms = {**target.mechanisms,
                                         mechanism: {**target.mechanisms[mechanism], "state": result}}
                self._refresh_statuses(session, target)
                target.updated_at = now
                target.revision = self._bump_revision(session)

    def cancel_job(self, job_id: str, reason: str) -> None:
        with self._transaction() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(("queued", "running")))
                            .values(status="cancelled", finished_at=utcnow(), message=reason[:2000]))

    def fail_job(self, job_id: str, error: str) -> None:
        """Requeue the job if attempts remain, otherwise mark it (and its target) failed."""
        now = utcnow()
        with self._transaction() as session:
            job = session.get(JobRow, job_id)
            if job is None or job.status != "running":
                return
            self._fail_or_retry(session, job, error, now)

    def recover_stale_jobs(self, stale_after_s: float) -> int:
        """Jobs whose worker stopped heart-beating (crash, kill -9) are retried or failed, never left running."""
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        with self._transaction() as session:
            stale = session.scalars(select(JobRow).where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
                                    .with_for_update(skip_locked=True)).all()
            for job in stale:
                self._fail_or_retry(session, job, f"worker {job.worker} stopped responding", now)
        if stale:
            logger.warning("jobs.recovered", extra={"count": len(stale)})
        return len(stale)

    # ------------------------------------------------------------ audit

    def write_audit(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        with self._transaction() as session:
            session.add_all(AuditRow(**asdict(entry)) for entry in entries)

    def list_audit(self, limit: int, since: float | None) -> list[AuditEntry]:
        with self._sessions() as session:
            query = select(AuditRow).order_by(AuditRow.created.desc(), AuditRow.id.desc()).limit(limit)
            if since is not None:
                query = query.where(AuditRow.created >= since)
            rows = session.scalars(query).all()
            return [views.audit_entry(row) for row in rows]

    def prune_audit(self, older_than: float) -> int:
        with self._transaction() as session:
            return session.execute(delete(AuditRow).where(AuditRow.created < older_than)).rowcount

    # ------------------------------------------------------------ helpers

    def _target_row(self, session: Session, target_id: str) -> TargetRow:
        row = session.get(TargetRow, target_id)
        if row is None:
            raise NotFound(f"No target `{target_id}`.", param="target_id", code="target_not_found")
        return row

    def _enqueue(self, session: Session, target_id: str, kind: str, now: datetime) -> None:
        session.add(JobRow(id=new_id("job"), target_id=target_id, kind=kind, status="queued", progress=0.0,
                           message="queued", attempts=0, max_attempts=3, payload={}, created_at=now))

    def _cancel_open_jobs(self, session: Session, target_id: str, now: datetime,
                          kinds: Sequence[str] | None = None) -> None:
        query = update(JobRow).where(JobRow.target_id == target_id, JobRow.status.in_(("queued", "running")))
        if kinds is not None:
            query = query.where(JobRow.kind.in_(list(kinds)))
        session.execute(query.values(status="cancelled", finished_at=now, message="superseded"))

    def _fail_or_retry(self, session: Session, job: JobRow, error: str, now: datetime) -> None:
        if job.attempts < job.max_attempts:
            job.status, job.message, job.error, job.worker = "queued", f"retrying after: {error}"[:2000], error, None
            return
        job.status, job.error, job.finished_at, job.message = "failed", error, now, "failed"
        target = session.get(TargetRow, job.target_id) if job.target_id else None
        if target is not None:
            if job.kind == FIT_CLASSIFIER and target.classifier.get("status") != "ready":
                target.classifier = {**target.classifier, "status": "failed"}
            self._refresh_statuses(session, target)
            target.updated_at = now
            target.revision = self._bump_revision(session)

    def _admit(self, session: Session, target_id: str | None, options: Mapping[str, Any]) -> None:
        """Refuse mechanisms the registry cannot serve alongside every other target's (e.g. O3's rank budget)."""
        others = session.scalars(select(TargetRow.mechanisms).where(TargetRow.id != (target_id or ""))).all()
        reason = self._catalog.admit(options, [{name: entry["options"] for name, entry in m.items()} for m in others])
        if reason is not None:
            raise Unprocessable(reason, param="mechanisms")

    def _preparation_kinds(self, row: TargetRow) -> list[str]:
        """The classifier fit plus every job the target's mechanisms need (SPEC §4: ECO/GUARD serve meanwhile)."""
        kinds = [FIT_CLASSIFIER]
        for name, entry in row.mechanisms.items():
            if name in self._catalog.implemented:
                kinds.extend(self._catalog.jobs_for(name, entry["options"]))
        return kinds

    def _changed_mechanism_kinds(self, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        """Jobs a mechanisms-only patch needs: those of new or re-optioned mechanisms, and a classifier refit when
        a mechanism whose gate lives in the classifier artifact (O3's OOD detector) is switched on or off."""
        kinds = []
        if CLASSIFIER_GATED & set(before) != CLASSIFIER_GATED & set(after):
            kinds.append(FIT_CLASSIFIER)
        for name, entry in after.items():
            if name in self._catalog.implemented and before.get(name, {}).get("options") != entry["options"]:
                kinds.extend(self._catalog.jobs_for(name, entry["options"]))
        return kinds

    def _enqueue_preparation(self, session: Session, row: TargetRow, now: datetime, kinds: Sequence[str]) -> None:
        for order, kind in enumerate(kinds):  # distinct timestamps: claimed in this order, the classifier first
            self._enqueue(session, row.id, kind, now + timedelta(microseconds=order))

    def _refresh_statuses(self, session: Session, target: TargetRow) -> None:
        """Re-derive the target's and its mechanisms' statuses (``status.derive_statuses``) from its jobs."""
        jobs = session.scalars(select(JobRow).where(JobRow.target_id == target.id)
                               .order_by(JobRow.created_at, JobRow.id))
        statuses = derive_statuses(target.mechanisms, target.classifier.get("status", "preparing"), latest_jobs(jobs),
                                   self._catalog.implemented, self._catalog.jobs_for)
        target.mechanisms, target.status = statuses.mechanisms, statuses.target

    def _jobs_by_target(self, session: Session, target_ids: list[str]) -> dict[str, list[JobRow]]:
        if not target_ids:
            return {}
        rows = session.scalars(select(JobRow).where(JobRow.target_id.in_(target_ids))
                               .order_by(JobRow.created_at, JobRow.id)).all()
        grouped: dict[str, list[JobRow]] = {}
        for row in rows:
            grouped.setdefault(row.target_id or "", []).append(row)
        return grouped
