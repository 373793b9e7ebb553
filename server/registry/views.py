"""Registry rows as the registry's own records (``records.py``): the one place that reads ORM rows into dataclasses,
so nothing outside the registry ever holds a row bound to a session."""

from __future__ import annotations

from collections.abc import Sequence

from server.registry.models import AuditRow, JobRow, TargetRow
from server.registry.records import (
    AuditEntry,
    ClassifierState,
    JobRecord,
    MechanismState,
    TargetRecord,
    TargetView,
)
from server.registry.request_meta import request_of


def target_record(row: TargetRow) -> TargetRecord:
    return TargetRecord(id=row.id, name=row.name, aliases=list(row.aliases), forget=list(row.forget),
                        retain=list(row.retain), mechanisms=dict(row.mechanisms), classifier=dict(row.classifier),
                        status=row.status)


def job_record(row: JobRow) -> JobRecord:
    return JobRecord(id=row.id, target_id=row.target_id, kind=row.kind, status=row.status, progress=row.progress,
                     message=row.message, error=row.error, attempts=row.attempts, created_at=row.created_at,
                     started_at=row.started_at, finished_at=row.finished_at)


def target_view(row: TargetRow, jobs: Sequence[JobRow], with_contents: bool) -> TargetView:
    """A target with its statuses and jobs; its forget and retain items only when ``with_contents`` (a single GET)."""
    classifier = row.classifier
    return TargetView(
        id=row.id, name=row.name, description=row.description, aliases=list(row.aliases), status=row.status,
        revision=row.revision,
        mechanisms={name: MechanismState(status=entry.get("status", "preparing"), options=entry.get("options", {}),
                                         message=entry.get("message"), state=entry.get("state") or {})
                    for name, entry in row.mechanisms.items()},
        classifier=ClassifierState(status=classifier.get("status", "preparing"),
                                   threshold=classifier.get("threshold"),
                                   false_positive_rate=classifier.get("false_positive_rate"),
                                   heldout_recall=classifier.get("heldout_recall"),
                                   ood_gate=classifier.get("ood_gate")),
        counts={"aliases": len(row.aliases), "forget": len(row.forget), "retain": len(row.retain)},
        jobs=[job_record(job) for job in jobs],
        created_at=row.created_at, updated_at=row.updated_at,
        forget=[dict(item) for item in row.forget] if with_contents else None,
        retain=[dict(item) for item in row.retain] if with_contents else None,
        request=request_of(row),
    )


def audit_entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(request_id=row.request_id, created=row.created, endpoint=row.endpoint, targets=row.targets,
                      mechanisms=row.mechanisms, scores=row.scores, outcome=row.outcome, prompt=row.prompt)
