"""HTTP routes of the admin API (``/admin/v1``, SPEC §4). Thin: authorise, validate, call ``AdminServing``.

The routes are plain ``def`` functions: FastAPI runs them in its thread pool, so database work never blocks the event
loop that streams tokens.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from server.admin.protocol import (
    AuditList,
    Deleted,
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
)
from server.admin.serving import AdminServing
from server.auth import has_bearer_key
from server.errors import AdminDisabled, AuthenticationFailed
from server.openai.protocol import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 503)
}


def require_admin_key(request: Request) -> None:
    key: str | None = request.app.state.settings.admin_key
    if not key:
        raise AdminDisabled()
    if not has_bearer_key(request, [key]):
        raise AuthenticationFailed("Invalid or missing admin key.")


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin_key)], responses=ERROR_RESPONSES,
                   tags=["admin"])


def _serving(request: Request) -> AdminServing:
    return request.app.state.admin


@router.post("/targets", status_code=201, response_model=TargetOut)
def create_target(body: TargetCreate, request: Request) -> JSONResponse:
    target = _serving(request).create_target(body)
    return JSONResponse(target.model_dump(mode="json"), status_code=201)


@router.get("/targets", response_model=TargetList)
def list_targets(request: Request) -> TargetList:
    return _serving(request).list_targets()


@router.get("/targets/{target_id}", response_model=TargetOut)
def get_target(target_id: str, request: Request) -> TargetOut:
    return _serving(request).get_target(target_id)


@router.patch("/targets/{target_id}", response_model=TargetOut)
def patch_target(target_id: str, body: TargetPatch, request: Request) -> TargetOut:
    return _serving(request).patch_target(target_id, body)


@router.delete("/targets/{target_id}", response_model=Deleted)
def delete_target(target_id: str, request: Request) -> Deleted:
    return _serving(request).delete_target(target_id)


@router.post("/negatives", status_code=201, response_model=NegativeList)
def add_negatives(body: NegativesCreate, request: Request) -> JSONResponse:
    added = _serving(request).add_negatives(body)
    return JSONResponse(added.model_dump(mode="json"), status_code=201)


@router.get("/negatives", response_model=NegativeList)
def list_negatives(request: Request) -> NegativeList:
    return _serving(request).list_negatives()


@router.delete("/negatives/{negative_id}", response_model=Deleted)
def delete_negative(negative_id: str, request: Request) -> Deleted:
    return _serving(request).delete_negative(negative_id)


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
          ) -> AuditList:
    return _serving(request).audit(limit, since)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Log-probabilities of given answers as the protected model sees them (for `lethe eval tofu`'s TOFU metrics)."""
    return await _serving(request).score(body)
