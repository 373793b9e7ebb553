"""The guards this build implements, in their fixed composition order, and the jobs each needs at registration.

Order: ECO first (it decides what prompt the engine sees), O3 (it decides which weights run), then the decoding-time
guards in the logits processor: GUARD (bans), then ULD (difference over the tokens still allowed). A request that hits
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
from guards.o3 import O3_TRAIN, O3Guard
from guards.uld import ULD_TRAIN, UldGuard

GUARD_TYPES = (EcoGuard, O3Guard, GuardFilter, UldGuard)
IMPLEMENTED_MECHANISMS: tuple[str, ...] = tuple(guard.name for guard in GUARD_TYPES)
JOB_MECHANISM: dict[str, str] = {ECO_CALIBRATE: EcoGuard.name, GUARD_PHRASES: GuardFilter.name,
                                 ULD_TRAIN: UldGuard.name, O3_TRAIN: O3Guard.name}


def preparation_jobs(mechanism: str, options: Mapping[str, Any]) -> list[str]:
    """Job kinds a mechanism registered with ``options`` needs before it can serve."""
    for guard in GUARD_TYPES:
        if guard.name == mechanism:
            return [job.kind for job in guard.prepare(options)]
    return []


def build_guards(tokenizer: Any, artifact_path: Callable[[str], Path], stacks_root: Path,
                 max_lora_rank: int) -> tuple[Guard, ...]:
    """The serving-side guard instances, in composition order."""
    return (EcoGuard(tokenizer), O3Guard(artifact_path, stacks_root, max_lora_rank), GuardFilter(artifact_path),
            UldGuard(artifact_path))
