"""What the registry takes and gives back: plain frozen dataclasses, no HTTP or API model types.

The admin API converts its request models into ``NewTarget`` / ``TargetChanges`` and these views into its responses
(``server/admin/serving.py``); the serving side reads ``TargetRecord``s; the pipeline writes ``AuditEntry``s. Keeping
the registry's own types here lets the API change shape without the registry, and the registry be used without HTTP.

Forget and retain items are stored as given: ``{"question", "answer"}`` or ``{"text"}`` dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Item = dict[str, str]


@dataclass(frozen=True)
class NewTarget:
    """A target to register; ``mechanisms`` maps each enabled mechanism to its options (defaults already filled in)."""

    name: str
    description: str
    aliases: Sequence[str]
    forget: Sequence[Item]
    retain: Sequence[Item]
    mechanisms: Mapping[str, dict[str, Any]]


@dataclass(frozen=True)
class TargetChanges:
    """A partial update: ``None`` leaves a field as it is; new ``mechanisms`` replace the enabled set."""

    description: str | None = None
    aliases: Sequence[str] | None = None
    forget: Sequence[Item] | None = None
    retain: Sequence[Item] | None = None
    mechanisms: Mapping[str, dict[str, Any]] | None = None


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

    @property
    def classifier_ready(self) -> bool:
        """Whether its prompt classifier is fitted (else the live snapshot detects it by its aliases alone)."""
        return self.classifier.get("status") == "ready"


@dataclass(frozen=True)
class JobRecord:
    id: str
    target_id: str | None
    kind: str
    status: str  # queued, running, succeeded, failed or cancelled
    progress: float
    message: str
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now owns: what its handler needs to run it. ``worker`` and ``attempts`` are the claim's fencing
    token: the queue accepts this run's writes only while the job's row still carries both (``server/job_lease.py``)."""

    id: str
    kind: str
    target_id: str | None
    attempts: int
    payload: dict[str, Any]
    worker: str = ""


@dataclass(frozen=True)
class MechanismState:
    status: str  # preparing, ready, failed or unavailable
    options: dict[str, Any]
    message: str | None
    state: dict[str, Any]  # what the mechanism's jobs published (artifact digests, calibrated values)


@dataclass(frozen=True)
class ClassifierState:
    status: str  # preparing, ready or failed
    threshold: float | None
    false_positive_rate: float | None
    heldout_recall: float | None
    ood_gate: dict[str, float | None] | None


@dataclass(frozen=True)
class TargetView:
    """A target with its derived statuses and jobs; ``forget`` and ``retain`` only when read one by one."""

    id: str
    name: str
    description: str
    aliases: list[str]
    status: str  # preparing, active, degraded (classifier not fitted: alias-gated) or failed
    revision: int
    mechanisms: dict[str, MechanismState]
    classifier: ClassifierState
    counts: dict[str, int]
    jobs: list[JobRecord]
    created_at: datetime
    updated_at: datetime
    forget: list[Item] | None = None
    retain: list[Item] | None = None


@dataclass(frozen=True)
class TargetListing:
    revision: int
    targets: list[TargetView]


@dataclass(frozen=True)
class RegistrySummary:
    revision: int
    targets: dict[str, int]  # count per status, and "total"
    jobs: dict[str, int]  # count per status


@dataclass(frozen=True)
class DeletedTarget:
    id: str
    revision: int


@dataclass(frozen=True)
class AuditEntry:
    """One inference request's audit record: written by the pipeline, stored, listed by the admin API."""

    request_id: str
    created: float
    endpoint: str
    targets: list[str]
    mechanisms: list[str]
    scores: dict[str, float]
    outcome: str
    prompt: str | None = None


@dataclass(frozen=True)
class NegativeRecord:
    """An operator's negative: a sample of their traffic that no target is about."""

    id: str
    text: str
    created_at: datetime


@dataclass(frozen=True)
class NegativesChange:
    """What adding or deleting negatives did: the records concerned and the registry revision it made."""

    records: tuple[NegativeRecord, ...]
    revision: int


@dataclass(frozen=True)
class ReplicaRecord:
    """A serving replica as it last reported: the registry revision its live snapshot is at."""

    id: str
    serving_revision: int  # -1 while it starts and has no snapshot yet
    last_seen: datetime


@dataclass(frozen=True)
class Tombstone:
    """What remains of a deleted target: no name, alias or text."""

    target_id: str
    revision: int  # the registry revision its deletion made
    deleted_at: datetime
    purged_at: datetime | None  # when its artifacts, audit prompts and database pages were last seen erased


@dataclass(frozen=True)
class ErasureState:
    """What one erasure pass reads from the registry, consistently: the revision, every artifact digest a live target
    references, and the deletions not yet purged."""

    revision: int
    referenced: frozenset[str]
    pending: tuple[Tombstone, ...]
