"""The guards this build implements, in their fixed composition order, and the jobs each needs at registration.

Order: ECO first (it decides what prompt the engine sees), then GUARD (it restricts decoding). A request that hits
several targets gets every hit target's ready mechanisms, applied in this order; within one mechanism, targets in
descending classifier score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from guards.base import Guard
from guards.eco import ECO_CALIBRATE, EcoGuard
from guards.guard_filter import GUARD_PHRASES, GuardFilter

GUARD_TYPES = (EcoGuard, GuardFilter)
IMPLEMENTED_MECHANISMS: tuple[str, ...] = tuple(guard.name for guard in GUARD_TYPES)
JOB_MECHANISM: dict[str, str] = {ECO_CALIBRATE: EcoGuard.name, GUARD_PHRASES: GuardFilter.name}


def preparation_jobs(mechanism: str, options: Mapping[str, Any]) -> list[str]:
    """Job kinds a mechanism registered with ``options`` needs before it can serve."""
    for guard in GUARD_TYPES:
        if guard.name == mechanism:
            return [job.kind for job in guard.prepare(options)]
    return []


def build_guards(tokenizer: Any, artifact_path: Callable[[str], Path]) -> tuple[Guard, ...]:
    """The serving-side guard instances, in composition order."""
    return (EcoGuard(tokenizer), GuardFilter(artifact_path))
