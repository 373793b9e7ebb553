"""Pydantic model of a target's erasure report (``GET /admin/v1/targets/{id}/report``): what was registered, what
each mechanism published, the last verification run and the hits, never a text of the target unless asked for
(``contents=true``). Built by ``server/verification/report.py``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.admin.protocol import JobOut, RequestOut

class ReportTarget(BaseModel):
    id: str
    name: str
    status: str
    revision: int
    created_at: datetime
    updated_at: datetime


class RegisteredCounts(BaseModel):
    aliases: int
    forget: int
    forget_questions: int
    forget_texts: int
    retain: int


class ReportContents(BaseModel):
    aliases: list[str]
    forget: list[dict[str, str]]
    retain: list[dict[str, str]]


class ReportMechanism(BaseModel):
    status: str
    options: dict[str, Any]
    state: dict[str, Any] = Field(description="What its jobs published, figures only (ECO: sigma, goal, search "
                                  "curve; GUARD: phrase and item counts; …): never a text of the target.")


class ReportClassifier(BaseModel):
    status: str
    threshold: float | None = None
    false_positive_rate: float | None = Field(None, description="Measured on held-out negatives at calibration.")
    heldout_recall: float | None = None


class DayHits(BaseModel):
    day: str
    hits: int


class ReportHits(BaseModel):
    total: int = Field(description="Inference requests that hit the target (audit records; verification probes are "
                       "not audited).")
    truncated: bool = Field(description="True when only the newest records were read.")
    outcomes: dict[str, int]
    by_day: list[DayHits]


class ReportOut(BaseModel):
    """A target's erasure report (``server/verification/report.py``)."""

    object: Literal["lethe.erasure_report"] = "lethe.erasure_report"
    generated_at: datetime
    target: ReportTarget
    request: RequestOut
    registered: RegisteredCounts
    contents: ReportContents | None = Field(None, description="The registered contents, only with `contents=true`.")
    classifier: ReportClassifier
    mechanisms: dict[str, ReportMechanism]
    verification: dict[str, Any] | None = Field(None, description=(
        "The last finished verification run: `summary` (leak rates before and after, detection rate, false-positive "
        "estimate, probes, revision), `families` (the same per probe family), `scores` (each probe's leak score "
        "before and after), `mechanisms_applied`; null before the first run."))
    verification_job: JobOut | None = Field(None, description="The newest verification job (queued, running, …).")
    hits: ReportHits
