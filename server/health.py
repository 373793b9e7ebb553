"""Whether a replica is ready to take traffic, decided from what it already knows (no query): its engine and its
registry snapshot's health (``SnapshotHolder.health``).

Not ready (503) when the engine is dead, when no snapshot was ever loaded (any prompt could be about a target it cannot
know), or when this replica's reloads fail while the registry answers and its snapshot is older than
``LETHE_REGISTRY_MAX_STALENESS_S``: the other replicas serve a registry this one cannot load, so traffic belongs with
them. With the registry itself unreachable every replica is in the same place, and turning them all not-ready would be
a full outage: the replica stays ready on its last snapshot and says so (``degraded``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from server.registry.snapshot import LOAD_FAILED, RegistryHealth

CURRENT = "current"  # the last poll found the snapshot current
STALE = "stale"  # no reload failed, yet none confirmed the snapshot for longer than allowed (a poll hangs)
LOADING = "loading"  # no snapshot loaded yet, and no reload failed


@dataclass(frozen=True)
class Readiness:
    status: str  # ok | degraded (ready, serving an older snapshot) | unavailable (not ready)
    reason: str | None = None  # why unavailable: engine | registry
    registry: str | None = None  # CURRENT, STALE, LOADING, or a reload failure (UNREACHABLE, LOAD_FAILED)
    staleness_s: float | None = None
    revision: int | None = None

    @property
    def ready(self) -> bool:
        return self.status != "unavailable"

    def body(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def registry_state(health: RegistryHealth, max_staleness_s: float) -> str:
    if health.failure is not None:
        return health.failure
    if not health.loaded:
        return LOADING
    return STALE if health.staleness_s > max_staleness_s else CURRENT


def readiness(engine_alive: bool, health: RegistryHealth | None, max_staleness_s: float) -> Readiness:
    """The readiness rule (docs/operations.md, *Health and readiness*)."""
    if not engine_alive:
        return Readiness("unavailable", reason="engine")
    if health is None:  # the replica is still starting: no registry yet
        return Readiness("unavailable", reason="registry", registry=LOADING)
    state = registry_state(health, max_staleness_s)
    if not health.loaded:
        return Readiness("unavailable", reason="registry", registry=state)
    served = {"registry": state, "staleness_s": round(health.staleness_s, 1), "revision": health.revision}
    if state == LOAD_FAILED and health.staleness_s > max_staleness_s:
        return Readiness("unavailable", reason="registry", **served)
    return Readiness("ok" if state == CURRENT else "degraded", **served)
