"""Registry rows as the API and the serving side see them (``admin.protocol`` models, ``TargetRecord``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.admin.protocol import ClassifierOut, ForgetItem, JobOut, MechanismOut, TargetOut
from server.registry.models import JobRow, TargetRow


@dataclass(frozen=True)
class TargetRecord:
    """A target as the serving side needs it (snapshot loading, job handlers)."""

    id: str
    name: str
    aliases: list[str]
    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    mechanisms: dict[str, Any]
    classifier: dict[str, Any]
    status: str


def stored_items(items: Sequence[ForgetItem]) -> list[dict[str, Any]]:
    return [item.model_dump(exclude_none=True) for item in items]


def target_record(row: TargetRow) -> TargetRecord:
    return TargetRecord(id=row.id, name=row.name, aliases=list(row.aliases), forget=list(row.forget),
                        retain=list(row.retain), mechanisms=dict(row.mechanisms), classifier=dict(row.classifier),
                        status=row.status)


def job_out(row: JobRow) -> JobOut:
    return JobOut(id=row.id, target_id=row.target_id, kind=row.kind, status=row.status, progress=row.progress,
                  message=row.message, error=row.error, attempts=row.attempts, created_at=row.created_at,
                  started_at=row.started_at, finished_at=row.finished_at)


def target_out(row: TargetRow, jobs: Sequence[JobRow], with_contents: bool) -> TargetOut:
    """The API's view of a target; its forget and retain items only when ``with_contents`` (a single GET)."""
    classifier = row.classifier
    return TargetOut(
        id=row.id, name=row.name, description=row.description, aliases=row.aliases, status=row.status,
        revision=row.revision,
        mechanisms={name: MechanismOut(status=entry.get("status", "preparing"), options=entry.get("options", {}),
                                       message=entry.get("message"), state=entry.get("state") or {})
                    for name, entry in row.mechanisms.items()},
        classifier=ClassifierOut(status=classifier.get("status", "preparing"),
                                 threshold=classifier.get("threshold"),
                                 false_positive_rate=classifier.get("false_positive_rate"),
                                 heldout_recall=classifier.get("heldout_recall"),
                                 ood_gate=classifier.get("ood_gate")),
        counts={"aliases": len(row.aliases), "forget": len(row.forget), "retain": len(row.retain)},
        jobs=[job_out(job) for job in jobs],
        created_at=row.created_at, updated_at=row.updated_at,
        forget=[ForgetItem(**item) for item in row.forget] if with_contents else None,
        retain=[ForgetItem(**item) for item in row.retain] if with_contents else None,
    )
