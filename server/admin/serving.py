"""The admin API's logic between its pydantic models (``protocol.py``) and the registry's dataclasses.

Requests become registry inputs here (a target without ``mechanisms`` gets ``LETHE_DEFAULT_MECHANISMS``, with every
option's default filled in by the protocol models) and registry records become responses, so the registry never sees
an HTTP type and the routes (``router.py``) stay thin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from server.admin.keys import ENVIRONMENT, digest, new_key
from server.admin.protocol import (
    ActionList,
    ActionOut,
    AdminKeyCreate,
    AdminKeyCreated,
    AdminKeyList,
    AdminKeyOut,
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
    RequestIn,
    RequestOut,
    ScoreRequest,
    ScoreResponse,
    TargetCreate,
    TargetList,
    TargetOut,
    TargetPatch,
    TombstoneList,
    TombstoneOut,
)
from server.admin.report_protocol import ReportOut
from server.planner import ChatTurn
from server.registry import Registry
from server.registry.console_sessions import ConsoleSession
from server.registry.readable import CLASSIFIER
from server.errors import Conflict
from server.registry.records import (
    ActionFilter,
    AdminKeyRecord,
    AuditFilter,
    Item,
    JobRecord,
    NegativeRecord,
    NewTarget,
    RequestChanges,
    RequestMetadata,
    TargetChanges,
    TargetFilter,
    TargetView,
    TombstoneFilter,
)
from server.registry.trail import LOCAL_ACTOR
from server.registry.snapshot import SnapshotHolder
from server.scoring import ScoredPrompt, ScoringService
from server.verification.report import build_report, hits_over_time


def stored_items(items: Sequence[ForgetItem]) -> list[Item]:
    return [item.stored() for item in items]


def request_metadata(body: RequestIn | None) -> RequestMetadata:
    return RequestMetadata(**body.model_dump()) if body is not None else RequestMetadata()


def new_target(body: TargetCreate, default_mechanisms: Sequence[str]) -> NewTarget:
    mechanisms = body.mechanisms or MechanismsIn.model_validate({name: {} for name in default_mechanisms})
    return NewTarget(name=body.name, description=body.description, aliases=list(body.aliases),
                     forget=stored_items(body.forget), retain=stored_items(body.retain),
                     mechanisms=mechanisms.enabled(), request=request_metadata(body.request))


def target_changes(patch: TargetPatch) -> TargetChanges:
    request = patch.request
    return TargetChanges(
        description=patch.description,
        aliases=list(patch.aliases) if patch.aliases is not None else None,
        forget=stored_items(patch.forget) if patch.forget is not None else None,
        retain=stored_items(patch.retain) if patch.retain is not None else None,
        mechanisms=patch.mechanisms.enabled() if patch.mechanisms is not None else None,
        request=RequestChanges(request_metadata(request), frozenset(request.model_fields_set))
        if request is not None and request.model_fields_set else None,
    )


def admin_key_out(record: AdminKeyRecord) -> AdminKeyOut:
    return AdminKeyOut(**asdict(record))


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
        request=RequestOut(**asdict(view.request)),
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

    def create_target(self, body: TargetCreate, actor: str = LOCAL_ACTOR) -> TargetOut:
        return self._out(self._registry.targets.create(new_target(body, self._default_mechanisms), actor))

    def list_targets(self, conditions: TargetFilter = TargetFilter()) -> TargetList:
        listing = self._registry.targets.listing(conditions)
        return TargetList(revision=listing.revision, data=[self._out(view) for view in listing.targets])

    def get_target(self, target_id: str) -> TargetOut:
        return self._out(self._registry.targets.get(target_id))

    def patch_target(self, target_id: str, body: TargetPatch, actor: str = LOCAL_ACTOR) -> TargetOut:
        return self._out(self._registry.targets.patch(target_id, target_changes(body), actor))

    def _out(self, view: TargetView) -> TargetOut:
        return served_as(target_out(view), self._snapshots.current.unreadable.get(view.id))

    def delete_target(self, target_id: str, actor: str = LOCAL_ACTOR) -> Deleted:
        deleted = self._registry.targets.delete(target_id, actor)
        return Deleted(id=deleted.id, revision=deleted.revision)

    def report(self, target_id: str, contents: bool = False) -> ReportOut:
        """The target's erasure report (``server/verification/report.py``): counts, request, mechanisms, the last
        verification run and the hits over time; its forget contents only when ``contents``."""
        view = self._registry.targets.get(target_id)
        verification = self._registry.targets.verification(target_id)
        hits = hits_over_time(self._registry.audit.page, target_id)
        return ReportOut.model_validate(build_report(view, verification, hits, contents))

    def verify(self, target_id: str, actor: str = LOCAL_ACTOR) -> JobOut:
        """Queue a verification run of the target now (recorded in the admin trail)."""
        return job_out(self._registry.targets.verify(target_id, actor))

    def add_negatives(self, body: NegativesCreate, actor: str = LOCAL_ACTOR) -> NegativeList:
        """Store the operator's negatives (those already stored are not repeated); returns the ones added."""
        change = self._registry.negatives.add(body.texts, actor)
        return NegativeList(revision=change.revision, data=[negative_out(r) for r in change.records])

    def list_negatives(self) -> NegativeList:
        revision, records = self._registry.negatives.listing()
        return NegativeList(revision=revision, data=[negative_out(r) for r in records])

    def delete_negative(self, negative_id: str, actor: str = LOCAL_ACTOR) -> Deleted:
        change = self._registry.negatives.delete(negative_id, actor)
        return Deleted(id=negative_id, revision=change.revision)

    def get_job(self, job_id: str) -> JobOut:
        return job_out(self._registry.jobs.get(job_id))

    def summary(self) -> RegistryOut:
        """The registry's counts, and the revision this replica's live snapshot serves."""
        summary = self._registry.targets.summary()
        return RegistryOut(revision=summary.revision, serving_revision=self._snapshots.current.revision,
                           targets=summary.targets, jobs=summary.jobs)

    def audit(self, limit: int, since: float | None, target_id: str | None = None,
              cursor: str | None = None) -> AuditList:
        page = self._registry.audit.page(AuditFilter(since=since, target_id=target_id), limit, cursor)
        return AuditList(data=[AuditRecord(**asdict(entry)) for entry in page.items], next_cursor=page.next_cursor)

    def actions(self, conditions: ActionFilter, limit: int, cursor: str | None = None) -> ActionList:
        page = self._registry.trail.page(conditions, limit, cursor)
        return ActionList(data=[ActionOut(**asdict(action)) for action in page.items], next_cursor=page.next_cursor)

    def tombstones(self, conditions: TombstoneFilter, limit: int, cursor: str | None = None) -> TombstoneList:
        page = self._registry.tombstones.page(conditions, limit, cursor)
        return TombstoneList(data=[TombstoneOut(**asdict(tombstone)) for tombstone in page.items],
                             next_cursor=page.next_cursor)

    # ------------------------------------------------------------ admin keys

    def admin_key_active(self, key_id: str) -> bool:
        """Whether ``key_id`` names an unrevoked registry key."""
        return self._registry.admin_keys.active(key_id)

    # ------------------------------------------------------------ web console sessions

    def open_console_session(self, key_id: str, lifetime_s: float) -> tuple[str, ConsoleSession]:
        return self._registry.console_sessions.open(key_id, lifetime_s)

    def console_session(self, token: str) -> ConsoleSession | None:
        return self._registry.console_sessions.get(token)

    def close_console_session(self, token: str) -> None:
        self._registry.console_sessions.close(token)

    def admin_key_holder(self, key_digest: str) -> str | None:
        """The id of the unrevoked registry key with this SHA-256 (``server/admin/keys.py``)."""
        return self._registry.admin_keys.holder(key_digest)

    def create_admin_key(self, body: AdminKeyCreate, environment_ids: Sequence[str],
                         actor: str = LOCAL_ACTOR) -> AdminKeyCreated:
        """A new registry key named ``body.id``: the key is in this answer only."""
        if body.id in environment_ids:
            raise Conflict(f"`{body.id}` is the id of a key the environment configures.", param="id")
        key = new_key()
        record = self._registry.admin_keys.create(body.id, digest(key), actor)
        return AdminKeyCreated(**asdict(record), key=key)

    def list_admin_keys(self, environment_ids: Sequence[str]) -> AdminKeyList:
        """The environment's keys (by id) and the registry's, revoked ones included; never a key or its hash."""
        environment = [AdminKeyOut(id=key_id, source=ENVIRONMENT) for key_id in environment_ids]
        return AdminKeyList(data=environment + [admin_key_out(r) for r in self._registry.admin_keys.listing()])

    def revoke_admin_key(self, key_id: str, environment_ids: Sequence[str], actor: str = LOCAL_ACTOR) -> AdminKeyOut:
        if key_id in environment_ids:
            raise Conflict(f"`{key_id}` is configured by the environment (LETHE_ADMIN_KEY, LETHE_ADMIN_KEYS): remove "
                           "it there and restart the replicas.", param="key_id")
        return admin_key_out(self._registry.admin_keys.revoke(key_id, actor))

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        scored = await self._scoring.score([ChatTurn(m.role, m.content) for m in body.messages], body.continuations)
        return score_response(scored)
