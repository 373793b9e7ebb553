"""The status rule (``server.registry.status``) on its own: what a target and its mechanisms show for given jobs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.registry.status import derive_statuses, latest_jobs

IMPLEMENTED = frozenset({"eco", "guard", "uld"})


def jobs_for(name: str, options: Mapping[str, Any]) -> list[str]:
    return {"uld": ["uld_train"], "eco": ["eco_calibrate"]}.get(name, [])


@dataclass
class Job:
    kind: str
    status: str
    error: str | None = None


def mechanisms(*names: str) -> dict[str, dict[str, Any]]:
    return {name: {"options": {}, "state": {}} for name in names}


def derive(names: tuple[str, ...], classifier: str, *jobs: Job):
    return derive_statuses(mechanisms(*names), classifier, latest_jobs(jobs), IMPLEMENTED, jobs_for)


def test_nothing_is_ready_before_the_classifier_is() -> None:
    statuses = derive(("guard", "eco"), "preparing", Job("fit_classifier", "running"), Job("eco_calibrate", "succeeded"))
    assert {name: m["status"] for name, m in statuses.mechanisms.items()} == {"guard": "preparing", "eco": "preparing"}
    assert statuses.target == "preparing"


def test_a_mechanism_is_ready_when_its_latest_jobs_succeeded_and_the_target_when_no_job_is_open() -> None:
    statuses = derive(("guard", "uld"), "ready", Job("fit_classifier", "succeeded"), Job("uld_train", "running"))
    assert statuses.mechanisms["guard"]["status"] == "ready" and statuses.mechanisms["uld"]["status"] == "preparing"
    assert statuses.target == "preparing"
    statuses = derive(("guard", "uld"), "ready", Job("uld_train", "succeeded"))
    assert statuses.mechanisms["uld"] == {"options": {}, "state": {}, "status": "ready", "message": None}
    assert statuses.target == "active"


def test_a_failed_job_fails_its_mechanism_with_the_jobs_error_and_the_target() -> None:
    statuses = derive(("guard", "uld"), "ready", Job("uld_train", "failed", "out of memory"))
    assert statuses.mechanisms["uld"]["status"] == "failed"
    assert statuses.mechanisms["uld"]["message"] == "out of memory"
    assert statuses.mechanisms["guard"]["status"] == "ready"
    assert statuses.target == "failed"


def test_a_failed_classifier_fails_every_implemented_mechanism() -> None:
    statuses = derive(("guard", "eco"), "failed")
    assert all(m["status"] == "failed" for m in statuses.mechanisms.values())
    assert statuses.target == "failed"


def test_a_cancelled_job_is_superseded_not_decisive() -> None:
    """A refit cancels the old job: the failed-then-cancelled run must not fail the target once the new one succeeds."""
    latest = latest_jobs([Job("uld_train", "succeeded"), Job("uld_train", "cancelled", "superseded")])
    assert latest["uld_train"].status == "succeeded"
    statuses = derive(("uld",), "ready", Job("uld_train", "failed", "boom"), Job("uld_train", "succeeded"),
                      Job("uld_train", "cancelled"))
    assert statuses.mechanisms["uld"]["status"] == "ready" and statuses.target == "active"


def test_an_unimplemented_mechanism_is_unavailable_and_does_not_hold_the_target_back() -> None:
    statuses = derive(("guard", "o3"), "ready")
    assert statuses.mechanisms["o3"]["status"] == "unavailable"
    assert statuses.target == "active"
