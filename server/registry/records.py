"""What the registry takes and gives back: plain frozen dataclasses, no HTTP or API model types.

The admin API converts its request models into ``NewTarget`` / ``TargetChanges`` and these views into its responses
(``server/admin/serving.py``); the serving side reads ``TargetRecord``s; the pipeline writes ``AuditEntry``s. Keeping
the registry's own types here lets the API change shape without the registry, and the registry be used without HTTP.

Forget and retain items are stored as given: ``{"question", "answer"}`` or ``{"text"}`` dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

Item = dict[str, str]
T = TypeVar("T")

LEGAL_BASES = ("gdpr_art17", "copyright", "hazard", "contract", "court_order", "other")
"""What a target's request may give as its legal basis: one word per kind, so that targets and tombstones can be
filtered and counted by it; the particulars (an article, a court, a clause) go in the request's notes."""


@dataclass(frozen=True)
class RequestMetadata:
    """The erasure or takedown request a target answers; every field optional.

    ``effective_at`` is when the request says erasure takes effect, recorded for the record: enforcement starts at the
    registration, whatever it says. ``requester`` is personal data: it is stored with the target only, never in the
    tombstone, the admin trail or a log line, and goes with the target's row.
    """

    reference: str | None = None  # the operator's ticket id: kept in the tombstone
    requester: str | None = None
    legal_basis: str | None = None  # one of LEGAL_BASES
    received_at: datetime | None = None  # naive UTC, as every registry time
    effective_at: datetime | None = None
    notes: str | None = None

    def names_set(self) -> list[str]:
        """The names of the fields that hold a value (for the admin trail: names only)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class RequestChanges:
    """A patch of a target's request: the ``fields`` named take their value in ``values`` (``None`` clears one); the
    others stay as they are."""

    values: RequestMetadata
    fields: frozenset[str]

    def applied_to(self, current: RequestMetadata) -> RequestMetadata:
        return replace(current, **{name: getattr(self.values, name) for name in self.fields})


@dataclass(frozen=True)
class NewTarget:
    """A target to register; ``mechanisms`` maps each enabled mechanism to its options (defaults already filled in)."""

    name: str
    description: str
    aliases: Sequence[str]
    forget: Sequence[Item]
    retain: Sequence[Item]
    mechanisms: Mapping[str, dict[str, Any]]
    request: RequestMetadata = RequestMetadata()


@dataclass(frozen=True)
class TargetChanges:
    """A partial update: ``None`` leaves a field as it is; new ``mechanisms`` replace the enabled set."""

    description: str | None = None
    aliases: Sequence[str] | None = None
    forget: Sequence[Item] | None = None
    retain: Sequence[Item] | None = None
    mechanisms: Mapping[str, dict[str, Any]] | None = None
    request: RequestChanges | None = None

    def names_set(self) -> list[str]:
        """The names of the fields this patch sets (``request.<field>`` for the request's), for the admin trail."""
        names = [name for name in ("description", "aliases", "forget", "retain", "mechanisms")
                 if getattr(self, name) is not None]
        return names + sorted(f"request.{name}" for name in (self.request.fields if self.request else ()))


@dataclass(frozen=True)
class TargetFilter:
    """Which targets a listing keeps: every given condition must hold (``received_*`` bounds are inclusive)."""

    reference: str | None = None
    legal_basis: str | None = None
    received_after: datetime | None = None
    received_before: datetime | None = None


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
    request: RequestMetadata = RequestMetadata()


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
    """What remains of a deleted target: no name, alias, text, requester or notes."""

    target_id: str
    revision: int  # the registry revision its deletion made
    deleted_at: datetime
    purged_at: datetime | None  # when its artifacts, audit prompts and database pages were last seen erased
    registered_at: datetime | None = None  # None for deletions made before tombstones kept it
    reference: str | None = None
    legal_basis: str | None = None
    received_at: datetime | None = None
    effective_at: datetime | None = None
    mechanisms: list[str] = field(default_factory=list)  # the mechanisms that enforced it
    verification: dict[str, Any] | None = None  # the summary figures of its last verification run


@dataclass(frozen=True)
class TombstoneFilter:
    target_id: str | None = None
    reference: str | None = None
    legal_basis: str | None = None
    since: datetime | None = None  # deleted at or after
    until: datetime | None = None  # deleted before


@dataclass(frozen=True)
class ActionRecord:
    """One admin action of the trail: names, never values."""

    id: int
    at: datetime
    actor: str  # the id of the admin key used, never the key
    action: str  # ``server.registry.trail`` names them
    target_id: str | None
    subject_id: str | None  # the negative or admin key acted on
    fields: list[str]  # the names of the fields the action set
    count: int | None  # how many objects it concerned (negatives added)
    revision: int | None  # the registry revision it made


@dataclass(frozen=True)
class ActionFilter:
    actor: str | None = None
    action: str | None = None
    target_id: str | None = None
    since: datetime | None = None  # at or after
    until: datetime | None = None  # before


@dataclass(frozen=True)
class AuditFilter:
    since: float | None = None  # Unix time; created at or after
    target_id: str | None = None  # records that hit it


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, newest first, and the opaque cursor of the next page (None on the last)."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class AdminKeyRecord:
    """A named admin key as listed: never the key, nor its hash."""

    id: str
    source: str  # "environment" (LETHE_ADMIN_KEY, LETHE_ADMIN_KEYS) or "registry" (created over the admin API)
    created_at: datetime | None = None
    created_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


@dataclass(frozen=True)
class ErasureState:
    """What one erasure pass reads from the registry, consistently: the revision, every artifact digest a live target
    references, and the deletions not yet purged."""

    revision: int
    referenced: frozenset[str]
    pending: tuple[Tombstone, ...]
