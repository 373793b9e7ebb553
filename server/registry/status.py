"""How a target's and its mechanisms' statuses follow from its classifier and its jobs: one pure rule.

Kept apart from the store's transactions so the rule can be read, and tested, on its own: a mechanism is ``ready``
when the classifier is ready and the latest of each of its jobs succeeded, ``failed`` when one of them (or the
classifier) failed, ``preparing`` otherwise; the target is ``active`` when nothing is left to do, ``failed`` when
anything failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


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
) -> TargetStatuses:
    """The statuses of a target whose stored mechanisms are ``mechanisms`` (name -> {"options", "state", ...})."""
    derived = {}
    for name, entry in mechanisms.items():
        kinds = jobs_for(name, entry["options"]) if name in implemented else []
        failed = [latest[kind].error for kind in kinds if kind in latest and latest[kind].status == "failed"]
        if name not in implemented:
            status, message = "unavailable", "this mechanism is not implemented in this build yet"
        elif classifier_status == "failed" or failed:
            status, message = "failed", (failed[0] if failed else "the classifier could not be fitted")
        elif classifier_status == "ready" and all(kind in latest and latest[kind].status == "succeeded"
                                                  for kind in kinds):
            status, message = "ready", None
        else:
            status, message = "preparing", None
        derived[name] = {**entry, "status": status, "message": message}
    open_jobs = any(job.status in ("queued", "running") for job in latest.values())
    if classifier_status == "failed" or any(m["status"] == "failed" for m in derived.values()):
        target = "failed"
    elif classifier_status == "ready" and not open_jobs:
        target = "active"
    else:
        target = "preparing"
    return TargetStatuses(derived, target)
