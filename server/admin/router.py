"""HTTP routes of the admin API (``/admin/v1``, SPEC §4). Thin: authorise, validate, call ``AdminServing``.

The routes are plain ``def`` functions: FastAPI runs them in its thread pool, so database work never blocks the event
loop that streams tokens. Every route requires an admin key (``require_admin_key``); the routes that change something
take the key's id as the ``actor`` the admin trail records (FastAPI resolves the dependency once per request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from server.admin.keys import key_holder
from server.admin.protocol import (
    MAX_PAGE,
    ActionList,
    ActionName,
    AdminKeyCreate,
    AdminKeyCreated,
    AdminKeyList,
    AdminKeyOut,
    AuditList,
    Cursor,
    Deleted,
    FilterDate,
    IdFilter,
    KeyId,
    LegalBasis,
    LineFilter,
    JobOut,
    NegativeList,
    NegativesCreate,
    RegistryOut,
    ScoreRequest,
    ScoreResponse,
    TargetCreate,
    TargetList,
    TargetOut,
    TargetPatch,
    TombstoneList,
)
from server.admin.report_protocol import ReportOut
from server.admin.serving import AdminServing
from server.auth import bearer_token
from server.console.rendering import report_page
from server.errors import AdminDisabled, AuthenticationFailed
from server.openai.protocol import ErrorResponse
from server.registry.records import ActionFilter, TargetFilter, TombstoneFilter

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 503)
}


def _environment_ids(request: Request) -> list[str]:
    return list(request.app.state.settings.environment_admin_keys)


def require_admin_key(request: Request) -> str:
    """The id of the admin key the request carries (its actor in the admin trail); 403 while the environment
    configures no admin key, 401 for a missing, unknown or revoked key (``server/admin/keys.py``)."""
    environment = request.app.state.settings.environment_admin_keys
    if not environment:
        raise AdminDisabled()
    serving: AdminServing | None = getattr(request.app.state, "admin", None)
    actor = key_holder(bearer_token(request), environment, serving.admin_key_holder if serving else None)
    if actor is None:
        raise AuthenticationFailed("Invalid or missing admin key.")
    return actor


Actor = Annotated[str, Depends(require_admin_key)]

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin_key)], responses=ERROR_RESPONSES,
                   tags=["admin"])


def _serving(request: Request) -> AdminServing:
    return request.app.state.admin


@router.post("/targets", status_code=201, response_model=TargetOut)
def create_target(body: TargetCreate, request: Request, actor: Actor) -> JSONResponse:
    target = _serving(request).create_target(body, actor)
    return JSONResponse(target.model_dump(mode="json"), status_code=201)


@router.get("/targets", response_model=TargetList)
def list_targets(request: Request,
                 reference: Annotated[LineFilter | None, Query(description="The request's reference.")] = None,
                 legal_basis: LegalBasis | None = None,
                 received_after: Annotated[FilterDate | None, Query(
                     description="Requests received at or after this date or date-time (UTC unless zoned).")] = None,
                 received_before: Annotated[FilterDate | None, Query(
                     description="Requests received at or before this date or date-time.")] = None,
                 ) -> TargetList:
    return _serving(request).list_targets(TargetFilter(reference=reference, legal_basis=legal_basis,
                                                       received_after=received_after,
                                                       received_before=received_before))


@router.get("/targets/{target_id}", response_model=TargetOut)
def get_target(target_id: str, request: Request) -> TargetOut:
    return _serving(request).get_target(target_id)


@router.patch("/targets/{target_id}", response_model=TargetOut)
def patch_target(target_id: str, body: TargetPatch, request: Request, actor: Actor) -> TargetOut:
    return _serving(request).patch_target(target_id, body, actor)


@router.delete("/targets/{target_id}", response_model=Deleted)
def delete_target(target_id: str, request: Request, actor: Actor) -> Deleted:
    return _serving(request).delete_target(target_id, actor)


@router.get("/targets/{target_id}/report", response_model=ReportOut,
            responses={200: {"content": {"text/html": {}},
                             "description": "The report (JSON, or HTML with format=html)"}})
def target_report(target_id: str, request: Request,
                  contents: bool = Query(False, description="Include the registered aliases and forget/retain items."),
                  format: Literal["json", "html"] = Query("json", description="`html`: a page with the plots."),
                  ) -> Any:
    """The target's erasure report: what was registered (counts), the request, mechanisms and their calibrated state,
    the last verification run (leak rate before → after, detection rate), hits over time, the false-positive
    estimate."""
    report = _serving(request).report(target_id, contents)
    if format == "html":
        return HTMLResponse(report_page(report.model_dump(mode="json")))
    return report


@router.post("/targets/{target_id}/verify", status_code=202, response_model=JobOut)
def verify_target(target_id: str, request: Request, actor: Actor) -> JSONResponse:
    """Queue a verification run of the target (the report shows it once it has finished)."""
    job = _serving(request).verify(target_id, actor)
    return JSONResponse(job.model_dump(mode="json"), status_code=202)


@router.post("/negatives", status_code=201, response_model=NegativeList)
def add_negatives(body: NegativesCreate, request: Request, actor: Actor) -> JSONResponse:
    added = _serving(request).add_negatives(body, actor)
    return JSONResponse(added.model_dump(mode="json"), status_code=201)


@router.get("/negatives", response_model=NegativeList)
def list_negatives(request: Request) -> NegativeList:
    return _serving(request).list_negatives()


@router.delete("/negatives/{negative_id}", response_model=Deleted)
def delete_negative(negative_id: str, request: Request, actor: Actor) -> Deleted:
    return _serving(request).delete_negative(negative_id, actor)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request) -> JobOut:
    return _serving(request).get_job(job_id)


@router.get("/registry", response_model=RegistryOut)
def registry(request: Request) -> RegistryOut:
    return _serving(request).summary()


@router.get("/audit", response_model=AuditList)
def audit(request: Request, limit: int = Query(100, ge=1, le=10_000),
          since: float | None = Query(None, allow_inf_nan=False,
                                      description="Unix time; only records created at or after it."),
          target_id: IdFilter | None = Query(None, description="Only the records that hit this target."),
          cursor: Cursor | None = Query(None, description="The previous page's `next_cursor`."),
          ) -> AuditList:
    return _serving(request).audit(limit, since, target_id, cursor)


@router.get("/actions", response_model=ActionList)
def actions(request: Request, limit: int = Query(100, ge=1, le=MAX_PAGE),
            actor: Annotated[KeyId | None, Query(description="An admin key's id.")] = None,
            action: ActionName | None = None,
            target_id: IdFilter | None = None,
            since: Annotated[FilterDate | None, Query(description="At or after (date-time or Unix time).")] = None,
            until: Annotated[FilterDate | None, Query(description="Before (date-time or Unix time).")] = None,
            cursor: Cursor | None = Query(None, description="The previous page's `next_cursor`."),
            ) -> ActionList:
    """The admin trail, newest first: every change made through the admin API, by whom (key id) and which fields."""
    conditions = ActionFilter(actor=actor, action=action, target_id=target_id, since=since, until=until)
    return _serving(request).actions(conditions, limit, cursor)


@router.get("/tombstones", response_model=TombstoneList)
def tombstones(request: Request, limit: int = Query(100, ge=1, le=MAX_PAGE),
               target_id: IdFilter | None = None,
               reference: Annotated[LineFilter | None, Query(description="The request's reference.")] = None,
               legal_basis: LegalBasis | None = None,
               since: Annotated[FilterDate | None, Query(description="Deleted at or after.")] = None,
               until: Annotated[FilterDate | None, Query(description="Deleted before.")] = None,
               cursor: Cursor | None = Query(None, description="The previous page's `next_cursor`."),
               ) -> TombstoneList:
    """What deleted targets left, newest deletion first: the request's reference, legal basis and dates, the
    mechanisms, the purge time; nothing that identifies whom or what a target was about."""
    conditions = TombstoneFilter(target_id=target_id, reference=reference, legal_basis=legal_basis, since=since,
                                 until=until)
    return _serving(request).tombstones(conditions, limit, cursor)


@router.post("/admin-keys", status_code=201, response_model=AdminKeyCreated)
def create_admin_key(body: AdminKeyCreate, request: Request, actor: Actor) -> JSONResponse:
    """A new named admin key, revocable at once on every replica; the key is in this answer only."""
    created = _serving(request).create_admin_key(body, _environment_ids(request), actor)
    return JSONResponse(created.model_dump(mode="json"), status_code=201)


@router.get("/admin-keys", response_model=AdminKeyList)
def list_admin_keys(request: Request) -> AdminKeyList:
    return _serving(request).list_admin_keys(_environment_ids(request))


@router.delete("/admin-keys/{key_id}", response_model=AdminKeyOut)
def revoke_admin_key(key_id: Annotated[KeyId, Path()], request: Request, actor: Actor) -> AdminKeyOut:
    """Revoke a registry key: every request with it is refused (401) from now on, on every replica."""
    return _serving(request).revoke_admin_key(key_id, _environment_ids(request), actor)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Log-probabilities of given answers as the protected model sees them (for `lethe eval tofu`'s TOFU metrics)."""
    return await _serving(request).score(body)
