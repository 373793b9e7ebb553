"""How a target's and its mechanisms' statuses follow from its classifier and its jobs: one pure rule.

Kept apart from the store's transactions so the rule can be read, and tested, on its own: a mechanism is ``ready``
when the classifier is ready and the latest of each of its jobs succeeded, ``failed`` when one of them failed,
``preparing`` otherwise; the target is ``active`` when nothing is left to do, ``failed`` when a mechanism's job failed.

A classifier that could not be fitted (its job failed after every attempt) does not drop the target: it stays in the
live snapshot, detected by its aliases alone and protected by its ready mechanisms or, failing those, by interim
protection (``guards/guard/interim.py``). The target is then ``degraded``; a mechanism whose jobs succeeded is
``ready`` on alias matches (its message says so), one whose gate the classifier job fits (O3's OOD detector) cannot
serve and is ``failed`` with why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from server.registry.catalog import FIT_CLASSIFIER, VERIFY_ERASURE


class JobState(Protocol):
    """What the rule reads of a job (a ``JobRow``)."""

    kind: str
    status: str
    error: str | None


@dataclass(frozen=True)
class TargetStatuses:
    mechanisms: dict[str, dict[str, Any]]  # each entry as stored, with "status" and "message" set
    target: str


def latest_jobs(jobs_in_creation_order: Iterable[JobState]) -> dict[str, JobState]:
    """The newest job of each kind that was not cancelled (a cancelled job was superseded; it decides nothing)."""
    latest: dict[str, JobState] = {}
    for job in jobs_in_creation_order:
        if job.status != "cancelled":
            latest[job.kind] = job
    return latest


def derive_statuses(
    mechanisms: Mapping[str, dict[str, Any]],
    classifier_status: str,
    latest: Mapping[str, JobState],
    implemented: frozenset[str],
    jobs_for: Callable[[str, Mapping[str, Any]], list[str]],
    classifier_fitted_gates: frozenset[str] = frozenset(),
) -> TargetStatuses:
    """The statuses of a target whose stored mechanisms are ``mechanisms`` (name -> {"options", "state", ...});
    ``classifier_fitted_gates``: the mechanisms whose own gate the classifier job fits."""
    degraded = classifier_status == "failed"
    fit = latest.get(FIT_CLASSIFIER)
    # An earlier fit serves, but the latest (after a patch of the target's contents) could not be done: the head does
    # not know the new contents, only the aliases do. Degraded too, never silently "active".
    stale = classifier_status == "ready" and fit is not None and fit.status == "failed"
    why = f"the classifier could not be fitted ({fit.error})" if fit is not None and fit.error else \
        "the classifier could not be fitted"
    derived = {}
    job_failed = False
    for name, entry in mechanisms.items():
        kinds = jobs_for(name, entry["options"]) if name in implemented else []
        failed = [latest[kind].error for kind in kinds if kind in latest and latest[kind].status == "failed"]
        succeeded = all(kind in latest and latest[kind].status == "succeeded" for kind in kinds)
        message = None
        if name not in implemented:
            status, message = "unavailable", "this mechanism is not implemented in this build yet"
        elif failed:
            status, message, job_failed = "failed", failed[0], True
        elif degraded and name in classifier_fitted_gates:
            status, message = "failed", f"cannot serve: its gate is fitted with the classifier, and {why}"
        elif degraded:
            status = "ready" if succeeded else "preparing"
            message = f"gated by alias matches only: {why}"
        elif classifier_status == "ready" and succeeded:
            status = "ready"
            if stale:
                message = f"gated by the previous classifier and the current aliases: the refit failed ({fit.error})"
        else:
            status = "preparing"
        derived[name] = {**entry, "status": status, "message": message}
    # A verification run measures the target's protection; waiting for it would keep the target "preparing".
    open_jobs = any(job.status in ("queued", "running") for kind, job in latest.items() if kind != VERIFY_ERASURE)
    if job_failed:
        target = "failed"
    elif degraded or stale:
        target = "degraded"
    elif classifier_status == "ready" and not open_jobs:
        target = "active"
    else:
        target = "preparing"
    return TargetStatuses(derived, target)
