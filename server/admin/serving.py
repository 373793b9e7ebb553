"""The admin API's logic between its pydantic models (``protocol.py``) and the registry's dataclasses.

Requests become registry inputs here (a target without ``mechanisms`` gets ``LETHE_DEFAULT_MECHANISMS``, with every
option's default filled in by the protocol models) and registry records become responses, so the registry never sees
an HTTP type and the routes (``router.py``) stay thin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from server.admin.protocol import (
    AuditList,
    AuditRecord,
    ClassifierOut,
    ContinuationScoreOut,
    Deleted,
    ForgetItem,
    JobOut,
    MechanismOut,
    MechanismsIn,
    NegativeList,
    NegativeOut,
    NegativesCreate,
    RegistryOut,
    ScoreRequest,
    ScoreResponse,
    TargetCreate,
    TargetList,
    TargetOut,
    TargetPatch,
)
from server.planner import ChatTurn
from server.registry import Registry
from server.registry.readable import CLASSIFIER
from server.registry.records import Item, JobRecord, NegativeRecord, NewTarget, TargetChanges, TargetView
from server.registry.snapshot import SnapshotHolder
from server.scoring import ScoredPrompt, ScoringService


def stored_items(items: Sequence[ForgetItem]) -> list[Item]:
    return [item.stored() for item in items]


def new_target(body: TargetCreate, default_mechanisms: Sequence[str]) -> NewTarget:
    mechanisms = body.mechanisms or MechanismsIn.model_validate({name: {} for name in default_mechanisms})
    return NewTarget(name=body.name, description=body.description, aliases=list(body.aliases),
                     forget=stored_items(body.forget), retain=stored_items(body.retain),
                     mechanisms=mechanisms.enabled())


def target_changes(patch: TargetPatch) -> TargetChanges:
    return TargetChanges(
        description=patch.description,
        aliases=list(patch.aliases) if patch.aliases is not None else None,
        forget=stored_items(patch.forget) if patch.forget is not None else None,
        retain=stored_items(patch.retain) if patch.retain is not None else None,
        mechanisms=patch.mechanisms.enabled() if patch.mechanisms is not None else None,
    )


def job_out(job: JobRecord) -> JobOut:
    return JobOut(**asdict(job))


def negative_out(record: NegativeRecord) -> NegativeOut:
    return NegativeOut(id=record.id, text=record.text, created_at=record.created_at)


def target_out(view: TargetView) -> TargetOut:
    return TargetOut(
        id=view.id, name=view.name, description=view.description, aliases=view.aliases, status=view.status,
        revision=view.revision,
        mechanisms={name: MechanismOut(status=m.status, options=m.options, message=m.message, state=m.state)
                    for name, m in view.mechanisms.items()},
        classifier=ClassifierOut(**asdict(view.classifier)),
        counts=view.counts, jobs=[job_out(job) for job in view.jobs],
        created_at=view.created_at, updated_at=view.updated_at,
        forget=[ForgetItem(**item) for item in view.forget] if view.forget is not None else None,
        retain=[ForgetItem(**item) for item in view.retain] if view.retain is not None else None,
    )


def served_as(target: TargetOut, unreadable: Mapping[str, str] | None) -> TargetOut:
    """The target as this replica serves it: ``degraded``, saying why, when it cannot read some of its artifacts
    (``server/registry/readable.py``); the registry's own view otherwise."""
    if not unreadable:
        return target
    parts = "; ".join(f"{part} ({why})" for part, why in sorted(unreadable.items()))
    serving = ("detected by its aliases alone, " if CLASSIFIER in unreadable else "") + \
        "protected by its other ready mechanisms or interim protection"
    mechanisms = {name: mechanism.model_copy(update={"status": "failed",
                                                     "message": f"this replica cannot read its artifact ({why})"})
                  if (why := unreadable.get(name)) else mechanism
                  for name, mechanism in target.mechanisms.items()}
    return target.model_copy(update={"status": "degraded", "mechanisms": mechanisms,
                                     "message": f"this replica cannot read: {parts}; meanwhile {serving}"})


def score_response(scored: ScoredPrompt) -> ScoreResponse:
    return ScoreResponse(targets=scored.targets, mechanisms=scored.mechanisms, scores=[
        ContinuationScoreOut(index=index, tokens=c.tokens, logprob=c.score.logprob, mean_loss=c.score.mean_loss,
                             token_logprobs=list(c.score.token_logprobs))
        for index, c in enumerate(scored.continuations)])


class AdminServing:
    """Every ``/admin/v1`` operation: protocol models in, registry or scoring calls, protocol models out."""

    def __init__(self, registry: Registry, default_mechanisms: Sequence[str], snapshots: SnapshotHolder,
                 scoring: ScoringService) -> None:
        self._registry = registry
        self._default_mechanisms = list(default_mechanisms)
        self._snapshots = snapshots
        self._scoring = scoring

    def create_target(self, body: TargetCreate) -> TargetOut:
        return self._out(self._registry.targets.create(new_target(body, self._default_mechanisms)))

    def list_targets(self) -> TargetList:
        listing = self._registry.targets.listing()
        return TargetList(revision=listing.revision, data=[self._out(view) for view in listing.targets])

    def get_target(self, target_id: str) -> TargetOut:
        return self._out(self._registry.targets.get(target_id))

    def patch_target(self, target_id: str, body: TargetPatch) -> TargetOut:
        return self._out(self._registry.targets.patch(target_id, target_changes(body)))

    def _out(self, view: TargetView) -> TargetOut:
        return served_as(target_out(view), self._snapshots.current.unreadable.get(view.id))

    def delete_target(self, target_id: str) -> Deleted:
        deleted = self._registry.targets.delete(target_id)
        return Deleted(id=deleted.id, revision=deleted.revision)

    def add_negatives(self, body: NegativesCreate) -> NegativeList:
        """Store the operator's negatives (those already stored are not repeated); returns the ones added."""
        change = self._registry.negatives.add(body.texts)
        return NegativeList(revision=change.revision, data=[negative_out(r) for r in change.records])

    def list_negatives(self) -> NegativeList:
        revision, records = self._registry.negatives.listing()
        return NegativeList(revision=revision, data=[negative_out(r) for r in records])

    def delete_negative(self, negative_id: str) -> Deleted:
        change = self._registry.negatives.delete(negative_id)
        return Deleted(id=negative_id, revision=change.revision)

    def get_job(self, job_id: str) -> JobOut:
        return job_out(self._registry.jobs.get(job_id))

    def summary(self) -> RegistryOut:
        """The registry's counts, and the revision this replica's live snapshot serves."""
        summary = self._registry.targets.summary()
        return RegistryOut(revision=summary.revision, serving_revision=self._snapshots.current.revision,
                           targets=summary.targets, jobs=summary.jobs)

    def audit(self, limit: int, since: float | None) -> AuditList:
        return AuditList(data=[AuditRecord(**asdict(entry)) for entry in self._registry.audit.recent(limit, since)])

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        scored = await self._scoring.score([ChatTurn(m.role, m.content) for m in body.messages], body.continuations)
        return score_response(scored)
