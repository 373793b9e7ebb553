"""What the registry needs to know about the mechanisms of this build, without naming any of them.

The catalog is built where the mechanisms are known (``server/control_plane.py``'s ``mechanism_catalog``, from
``guards/mechanisms.py``); the registry only asks it which jobs a target needs and whether a target can be admitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FIT_CLASSIFIER = "fit_classifier"
VERIFY_ERASURE = "verify_erasure"
"""The verification run of a target's erasure report (``server/verification/``): it measures the protection, it does
not prepare it, so it never decides a target's status (``status.derive_statuses``)."""


@dataclass(frozen=True)
class MechanismCatalog:
    implemented: frozenset[str] = frozenset()
    jobs_for: Callable[[str, Mapping[str, Any]], list[str]] = field(default=lambda name, options: [])
    job_mechanism: Mapping[str, str] = field(default_factory=dict)  # job kind -> the mechanism it prepares
    # (a target's enabled mechanisms, every other target's) -> why the registry cannot take it, or None
    admit: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], str | None] = field(
        default=lambda mechanisms, others: None)
    # Mechanisms whose gate the classifier job fits into the classifier artifact (O3's OOD detector): switching one on
    # or off refits the classifier, and the live snapshot stacks those gates for the targets that enable one.
    classifier_fitted_gates: frozenset[str] = frozenset()
    # Queue a verification run (``VERIFY_ERASURE``) behind every change that queues preparation jobs.
    verify_after_changes: bool = False
    # (mechanism, its options) -> the mechanisms its preparation is calibrated on top of (``guards.stacking``)
    calibrated_on: Callable[[str, Mapping[str, Any]], Sequence[str]] = field(default=lambda name, options: ())

    def preparation_kinds(self, mechanisms: Mapping[str, Any]) -> list[str]:
        """The classifier fit plus every job the target's mechanisms need (SPEC §4: ECO/GUARD serve meanwhile)."""
        kinds = [FIT_CLASSIFIER]
        for name, entry in mechanisms.items():
            if name in self.implemented:
                kinds.extend(self.jobs_for(name, entry["options"]))
        return kinds

    def with_verification(self, kinds: list[str]) -> list[str]:
        """``kinds`` followed by the verification run when verification follows changes: last, so a worker claims it
        after the target's own jobs of its lane."""
        return [*kinds, VERIFY_ERASURE] if self.verify_after_changes else kinds

    def changed_mechanism_kinds(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
        """Jobs a mechanisms-only patch needs: those of new or re-optioned mechanisms and of the mechanisms calibrated
        on top of one that was added, removed or re-optioned (a stale calibration would assume a stack that no longer
        serves), and a classifier refit when a mechanism whose gate lives in the classifier artifact is switched on
        or off."""
        kinds = []
        gates = self.classifier_fitted_gates
        if gates & set(before) != gates & set(after):
            kinds.append(FIT_CLASSIFIER)
        changed = {name for name in {*before, *after}
                   if (before.get(name) or {}).get("options") != (after.get(name) or {}).get("options")}
        for name, entry in after.items():
            if name in self.implemented and (name in changed
                                             or changed & set(self.calibrated_on(name, entry["options"]))):
                kinds.extend(self.jobs_for(name, entry["options"]))
        return kinds
