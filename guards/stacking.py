"""Combinations calibrated as combinations (issue 16): what a mechanism's calibration measures on top of.

GUARD's ban and ULD's α are each calibrated so that the target's true answers are, against wrong ones, as likely as a
stranger's (``guards.never_seen``). Each alone, on the plain model: stacked on one target, both push the same answers
down, and the pair over-forgets and can break the replies that each alone kept fluent (all four mechanisms on the full
demo model, forget01: fluency 0.00, 0.78 and 0.50 over three seeds, ULD alone 0.84, GUARD alone 0.95). So a
mechanism may name the mechanisms it is calibrated on top of (``Mechanism.calibrated_on``: ULD's α on GUARD), and its
calibration then measures with theirs applied beneath, as they will serve the target (``Mechanism.beneath_hooks``:
GUARD's hooks at the ban its own job finds, recomputed on the same inputs so that nothing waits for another job).

A change to a mechanism beneath (added, removed, re-optioned) re-runs the jobs of the mechanisms calibrated on it
(the registry's ``MechanismCatalog.changed_mechanism_kinds``). Mechanisms stay independent of one another: the
composition is handed to a job through ``JobResources.beneath``, built here from the list of mechanisms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from guards.job_interface import JobTarget, registered_options, target_spec
from guards.probe import HookFactory, ModelProbe, stacked

if TYPE_CHECKING:
    from classifiers.types import TargetSpec
    from guards.base import Mechanism

QuestionHooks = Callable[[str], HookFactory]
"""A target's forget question -> the hooks its reply is decoded and scored under."""

Beneath = Callable[[ModelProbe, Callable[[str], None]], tuple[QuestionHooks, dict[str, Any]]]
"""``(probe, progress) -> (hooks per forget question, what each mechanism beneath assumed, by name)``."""

BeneathHooks = Callable[[ModelProbe, "TargetSpec", Mapping[str, Any], Callable[[str], None]],
                        tuple[QuestionHooks, dict[str, Any]]]
"""A mechanism as it will serve a target with its registered options: ``(probe, spec, options, progress) -> (hooks
per forget question, what it assumed: JSON-safe, for the state of the mechanism calibrated on top)``."""


def beneath_of(mechanisms: Sequence[Mechanism]) -> Callable[[JobTarget, str], Beneath | None]:
    """``(target, mechanism) ->`` what that mechanism's calibration stands on for that target (None: nothing), the
    mechanisms beneath in the order ``mechanisms`` applies them."""
    by_name = {mechanism.name: mechanism for mechanism in mechanisms}

    def for_target(target: JobTarget, name: str) -> Beneath | None:
        wanted = set(by_name[name].calibrated_on(registered_options(target, name)))
        under = [mechanism for mechanism in mechanisms if mechanism.name in wanted
                 and mechanism.name in target.mechanisms and mechanism.beneath_hooks is not None]
        if not under:
            return None
        spec = target_spec(target)

        def beneath(probe: ModelProbe, progress: Callable[[str], None]) -> tuple[QuestionHooks, dict[str, Any]]:
            hooks, assumed = [], {}
            for mechanism in under:
                label = mechanism.name.upper()
                each, assumed[mechanism.name] = mechanism.beneath_hooks(
                    probe, spec, registered_options(target, mechanism.name),
                    lambda message, label=label: progress(f"{label} beneath: {message}"))
                hooks.append(each)
            return (lambda question: stacked(*(each(question) for each in hooks))), assumed

        return beneath

    return for_target
