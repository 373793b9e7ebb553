"""``TargetStore``: forget targets, their revisions and statuses, and the snapshot rows the replicas serve.

Every public method is one transaction: a failed create, patch or delete writes nothing. Every change that serving
replicas must see bumps the registry revision in the same transaction, which is what replicas poll for. A change to a
target's contents or mechanisms queues the jobs that prepare it (``JobQueue``) in that same transaction, and every
create, patch and delete appends its entry to the admin trail (``trail.py``) in it too.

A target carries the request it answers (``RequestMetadata``): recorded, filterable, never a delay (it is enforced
from its registration), and a patch of the request alone queues no job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Conflict, NotFound, Unprocessable
from server.registry import trail, views
from server.registry.catalog import VERIFY_ERASURE, MechanismCatalog
from server.registry.database import RegistryDatabase, bump_revision, new_id, read_revision, utcnow
from server.registry.erasure import redact_prompts
from server.registry.job_queue import JobQueue
from server.registry.models import JobRow, TargetRow
from server.registry.records import (
    DeletedTarget,
    JobRecord,
    NewTarget,
    RegistrySummary,
    RequestMetadata,
    TargetChanges,
    TargetFilter,
    TargetListing,
    TargetRecord,
    TargetView,
)
from server.registry.request_meta import check_dates, request_of, stored
from server.registry.tombstones import bury

logger = logging.getLogger(__name__)

MIN_FORGET_SOURCES = 2  # the classifier's threshold is calibrated on held-out sources: it needs two at least


def check_fittable(aliases: Sequence[str], forget: Sequence[Any]) -> None:
    if len(aliases) + len(forget) < MIN_FORGET_SOURCES:
        raise Unprocessable("A target needs at least two forget items, or one item and an alias, so that its "
                            "classifier can be calibrated on held-out data.", param="forget")


def created_fields(new: NewTarget) -> list[str]:
    """The names of the fields a registration set (for the admin trail), ``request.<field>`` for the request's."""
    names = ["name", "description", "aliases", "forget", "retain", "mechanisms"]
    return [name for name in names if getattr(new, name)] + [f"request.{name}" for name in new.request.names_set()]


class TargetStore:
    def __init__(self, database: RegistryDatabase, jobs: JobQueue, catalog: MechanismCatalog) -> None:
        self._database = database
        self._jobs = jobs
        self.catalog = catalog

    # ------------------------------------------------------------ reads

    def revision(self) -> int:
        with self._database.session() as session:
            return read_revision(session)

    def listing(self, conditions: TargetFilter = TargetFilter()) -> TargetListing:
        """Every target that meets ``conditions``, oldest first, without its contents."""
        query = select(TargetRow).order_by(TargetRow.created_at, TargetRow.id)
        if conditions.reference is not None:
            query = query.where(TargetRow.request_reference == conditions.reference)
        if conditions.legal_basis is not None:
            query = query.where(TargetRow.request_legal_basis == conditions.legal_basis)
        if conditions.received_after is not None:
            query = query.where(TargetRow.request_received_at >= conditions.received_after)
        if conditions.received_before is not None:
            query = query.where(TargetRow.request_received_at <= conditions.received_before)
        with self._database.session() as session:
            revision = read_revision(session)
            rows = session.scalars(query).all()
            jobs = self._jobs.jobs_by_target(session, [row.id for row in rows])
            targets = [views.target_view(row, jobs.get(row.id, []), with_contents=False) for row in rows]
        return TargetListing(revision=revision, targets=targets)

    def get(self, target_id: str) -> TargetView:
        with self._database.session() as session:
            row = self._target_row(session, target_id)
            jobs = self._jobs.jobs_by_target(session, [row.id])
            return views.target_view(row, jobs.get(row.id, []), with_contents=True)

    def request(self, target_id: str) -> RequestMetadata:
        """The request the target answers (what its report and tombstone start from)."""
        with self._database.session() as session:
            return request_of(self._target_row(session, target_id))

    def verification(self, target_id: str) -> dict[str, Any] | None:
        """The target's last finished verification run (``server/verification/``), None before the first."""
        with self._database.session() as session:
            verification = self._target_row(session, target_id).verification
            return dict(verification) if verification is not None else None

    def record(self, target_id: str) -> TargetRecord:
        with self._database.session() as session:
            return views.target_record(self._target_row(session, target_id))

    def snapshot_rows(self) -> tuple[int, list[TargetRecord]]:
        """The revision and every target, read consistently in one transaction. A target is served from its
        registration to its deletion: until its classifier is fitted (or when it could not be), by its aliases."""
        with self._database.transaction() as session:
            revision = read_revision(session)
            rows = session.scalars(select(TargetRow).order_by(TargetRow.id)).all()
            return revision, [views.target_record(row) for row in rows]

    def summary(self) -> RegistrySummary:
        with self._database.session() as session:
            revision = read_revision(session)
            targets = dict(session.execute(select(TargetRow.status, func.count()).group_by(TargetRow.status)).all())
            jobs = dict(session.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        targets["total"] = sum(targets.values())
        return RegistrySummary(revision=revision, targets=targets, jobs=jobs)

    # ------------------------------------------------------------ writes

    def create(self, new: NewTarget, actor: str = trail.LOCAL_ACTOR) -> TargetView:
        now = utcnow()
        check_fittable(new.aliases, new.forget)
        check_dates(new.request)
        options = dict(new.mechanisms)
        try:
            with self._database.transaction() as session:
                if session.scalar(select(TargetRow.id).where(TargetRow.name == new.name)) is not None:
                    raise Conflict(f"A target named `{new.name}` already exists.", param="name")
                self._admit(session, None, options)
                revision = bump_revision(session)
                row = TargetRow(
                    id=new_id("tgt"), name=new.name, description=new.description, aliases=list(new.aliases),
                    forget=[dict(item) for item in new.forget], retain=[dict(item) for item in new.retain],
                    mechanisms={name: {"options": opts, "state": {}} for name, opts in options.items()},
                    classifier={"status": "preparing"}, status="preparing", revision=revision, created_at=now,
                    updated_at=now, **stored(new.request),
                )
                session.add(row)
                session.flush()
                kinds = self.catalog.with_verification(self.catalog.preparation_kinds(row.mechanisms))
                self._jobs.enqueue(session, row.id, kinds, now)
                self._jobs.refresh_statuses(session, row)
                trail.record(session, actor, trail.TARGET_CREATE, target_id=row.id, revision=revision,
                             fields=created_fields(new))
        except IntegrityError as exc:  # a concurrent create with the same name won the race
            raise Conflict(f"A target named `{new.name}` already exists.", param="name") from exc
        logger.info("target.created", extra={"target_id": row.id, "revision": revision, "actor": actor})
        return self.get(row.id)

    def patch(self, target_id: str, changes: TargetChanges, actor: str = trail.LOCAL_ACTOR) -> TargetView:
        now = utcnow()
        with self._database.transaction() as session:
            row = self._target_row(session, target_id)
            changed_contents = False
            previous_mechanisms = dict(row.mechanisms)
            if changes.request is not None:
                request = changes.request.applied_to(request_of(row))
                check_dates(request)
                for column, value in stored(request).items():
                    setattr(row, column, value)
            if changes.description is not None:
                row.description = changes.description
            if changes.aliases is not None:
                row.aliases, changed_contents = list(changes.aliases), True
            if changes.forget is not None:
                row.forget, changed_contents = [dict(item) for item in changes.forget], True
            if changes.retain is not None:
                row.retain, changed_contents = [dict(item) for item in changes.retain], True
            if changes.mechanisms is not None:
                # A mechanism kept across the patch keeps serving its published state until its jobs replace it.
                enabled = dict(changes.mechanisms)
                self._admit(session, row.id, enabled)
                row.mechanisms = {name: {"options": opts, "state": row.mechanisms.get(name, {}).get("state", {})}
                                  for name, opts in enabled.items()}
            check_fittable(row.aliases, row.forget)
            if changed_contents:
                # New contents: everything is refitted; the old classifier and states serve until replaced.
                self._jobs.cancel_open(session, row.id, now)
                self._jobs.enqueue(session, row.id,
                                   self.catalog.with_verification(self.catalog.preparation_kinds(row.mechanisms)), now)
            elif changes.mechanisms is not None:
                # Only the mechanisms changed: redo just what their new options need, then verify again (a new
                # mechanism set changes what protects the target even when it queues no job).
                kinds = self.catalog.with_verification(
                    self.catalog.changed_mechanism_kinds(previous_mechanisms, row.mechanisms))
                self._jobs.cancel_open(session, row.id, now, kinds)
                self._jobs.enqueue(session, row.id, kinds, now)
            if changed_contents or changes.mechanisms is not None:
                self._jobs.refresh_statuses(session, row)
            row.revision = bump_revision(session)
            row.updated_at = now
            trail.record(session, actor, trail.TARGET_PATCH, target_id=target_id, fields=changes.names_set(),
                         revision=row.revision)
        logger.info("target.patched", extra={"target_id": target_id, "refit": changed_contents, "actor": actor,
                                             "mechanisms_changed": changes.mechanisms is not None})
        return self.get(target_id)

    def delete(self, target_id: str, actor: str = trail.LOCAL_ACTOR) -> DeletedTarget:
        """Remove the target and, in the same transaction, what the database holds of it elsewhere: its jobs'
        messages and errors are blanked, stored audit prompts that hit it or name an alias are redacted, and a
        tombstone without content (``tombstones.py``) records the deletion. Its artifacts stay until the erasure pass
        can purge them (``server/erasure.py``): a replica may still serve the previous revision."""
        now = utcnow()
        with self._database.transaction() as session:
            row = self._target_row(session, target_id)
            self._jobs.cancel_open(session, row.id, now)
            self._jobs.scrub(session, row.id)
            redacted = redact_prompts(session, [row.id], row.aliases)
            revision = bump_revision(session)
            bury(session, row, revision, now)
            session.delete(row)
            trail.record(session, actor, trail.TARGET_DELETE, target_id=target_id, revision=revision)
        logger.info("target.deleted", extra={"target_id": target_id, "revision": revision, "actor": actor,
                                             "audit_prompts_redacted": redacted})
        return DeletedTarget(id=target_id, revision=revision)

    def verify(self, target_id: str, actor: str = trail.LOCAL_ACTOR) -> JobRecord:
        """Queue a verification run of the target now (an open one is superseded); recorded in the admin trail.
        No revision bump: it changes nothing replicas serve."""
        now = utcnow()
        with self._database.transaction() as session:
            row = self._target_row(session, target_id)
            self._jobs.cancel_open(session, row.id, now, [VERIFY_ERASURE])
            job, = self._jobs.enqueue(session, row.id, [VERIFY_ERASURE], now)
            trail.record(session, actor, trail.TARGET_VERIFY, target_id=target_id)
            session.flush()
            record = views.job_record(job)
        logger.info("target.verify_queued", extra={"target_id": target_id, "job_id": record.id, "actor": actor})
        return record

    # ------------------------------------------------------------ helpers

    def _target_row(self, session: Session, target_id: str) -> TargetRow:
        row = session.get(TargetRow, target_id)
        if row is None:
            raise NotFound(f"No target `{target_id}`.", param="target_id", code="target_not_found")
        return row

    def _admit(self, session: Session, target_id: str | None, options: Mapping[str, Any]) -> None:
        """Refuse mechanisms the registry cannot serve alongside every other target's (e.g. O3's rank budget)."""
        others = session.scalars(select(TargetRow.mechanisms).where(TargetRow.id != (target_id or ""))).all()
        reason = self.catalog.admit(options, [{name: entry["options"] for name, entry in m.items()} for m in others])
        if reason is not None:
            raise Unprocessable(reason, param="mechanisms")
