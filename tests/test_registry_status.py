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


def derive(names: tuple[str, ...], classifier: str, *jobs: Job, gates: frozenset[str] = frozenset(),
           implemented: frozenset[str] = IMPLEMENTED):
    return derive_statuses(mechanisms(*names), classifier, latest_jobs(jobs), implemented, jobs_for, gates)


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


def test_a_classifier_that_could_not_be_fitted_degrades_the_target_instead_of_failing_it() -> None:
    """The target stays enforced on its aliases: its mechanisms whose jobs succeeded serve (alias-gated, and they say
    so), those still preparing keep preparing, and a mechanism whose gate the classifier job fits cannot serve."""
    statuses = derive(("guard", "eco", "o3"), "failed", Job("fit_classifier", "failed", "no negatives"),
                      Job("eco_calibrate", "running"), gates=frozenset({"o3"}), implemented=IMPLEMENTED | {"o3"})
    assert statuses.target == "degraded"
    assert {name: m["status"] for name, m in statuses.mechanisms.items()} == {
        "guard": "ready", "eco": "preparing", "o3": "failed"}
    assert statuses.mechanisms["guard"]["message"] == (
        "gated by alias matches only: the classifier could not be fitted (no negatives)")
    assert "its gate is fitted with the classifier" in statuses.mechanisms["o3"]["message"]
    assert derive(("guard",), "failed", Job("fit_classifier", "failed", "boom")).target == "degraded"  # jobs done


def test_a_failed_mechanism_job_fails_a_degraded_target() -> None:
    statuses = derive(("guard", "uld"), "failed", Job("fit_classifier", "failed", "boom"),
                      Job("uld_train", "failed", "out of memory"))
    assert statuses.target == "failed" and statuses.mechanisms["uld"]["message"] == "out of memory"
    assert statuses.mechanisms["guard"]["status"] == "ready"


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


def test_a_refit_that_fails_after_an_earlier_fit_degrades_the_target_and_says_what_serves() -> None:
    statuses = derive(("guard",), "ready", Job("fit_classifier", "failed", "no negatives"))
    assert statuses.target == "degraded"
    assert statuses.mechanisms["guard"]["status"] == "ready"
    assert "previous classifier" in statuses.mechanisms["guard"]["message"]
    assert "no negatives" in statuses.mechanisms["guard"]["message"]
