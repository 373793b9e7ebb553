"""Readiness under registry trouble: a replica whose registry is unreachable stays ready on its last snapshot (every
replica is in the same place: not-ready everywhere would be a full outage) and says so; one that cannot load what the
registry answers goes not-ready once its snapshot is older than ``LETHE_REGISTRY_MAX_STALENESS_S``; both recover at
the next good poll (small fakes for the registry, the bank and the clock; the app without its engine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from server.app import create_app
from server.config import Settings
from server.control_plane import ControlPlane
from server.health import CURRENT, LOADING, STALE, Readiness, readiness
from server.metrics import Metrics
from server.registry.records import TargetRecord
from server.registry.snapshot import LOAD_FAILED, UNREACHABLE, RegistryHealth, SnapshotHolder

MAX_STALENESS_S = 30.0
ADA = TargetRecord("tgt_ada", "ada", ["Ada Lindqvist"], [], [], {}, {"status": "queued"}, "preparing")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    """The targets store as the holder reads it; ``down`` makes every read fail as an unreachable database does."""

    def __init__(self) -> None:
        self.revision_now = 1
        self.down: Exception | None = None

    def revision(self) -> int:
        if self.down is not None:
            raise self.down
        return self.revision_now

    def snapshot_rows(self) -> tuple[int, list[TargetRecord]]:
        return self.revision(), [ADA]


class FakeBank:
    """The bank factory; ``broken`` makes it fail as a replica that cannot load its classifiers does."""

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, artifacts, aliases, negatives):
        if self.broken:
            raise RuntimeError("the embedding model failed to load")
        return ("bank", tuple(aliases))


def refused() -> OperationalError:
    return OperationalError("SELECT revision FROM registry_state", {}, ConnectionRefusedError("connection refused"))


@pytest.fixture
def parts() -> tuple[FakeRegistry, FakeBank, Clock, SnapshotHolder]:
    registry, bank, clock = FakeRegistry(), FakeBank(), Clock()
    holder = SnapshotHolder(registry, lambda digest: Path("/nonexistent") / digest, bank, poll_s=0.25, clock=clock)
    return registry, bank, clock, holder


def reload(holder: SnapshotHolder) -> bool:
    return asyncio.run(holder.reload())


def ready(holder: SnapshotHolder) -> Readiness:
    return readiness(True, holder.health(), MAX_STALENESS_S)


# ---------------------------------------------------------------- the holder's health


def test_a_poll_that_finds_the_revision_unchanged_confirms_the_snapshot(parts) -> None:
    registry, _, clock, holder = parts
    assert reload(holder) and holder.health() == RegistryHealth(1, 0.0, None)
    clock.now += 12.5
    assert holder.health().staleness_s == 12.5
    assert reload(holder) and holder.health().staleness_s == 0.0  # nothing moved: confirmed all the same


@pytest.mark.parametrize("error", [refused(), InterfaceError("SELECT", {}, OSError("closed")),
                                   PoolTimeout("QueuePool limit reached")])
def test_a_registry_that_cannot_be_read_is_unreachable_and_the_last_snapshot_stays_ready(parts, error) -> None:
    registry, _, clock, holder = parts
    reload(holder)
    registry.down = error
    for _ in range(5):
        clock.now += 10
        assert not reload(holder)
    health = holder.health()
    assert (health.failure, health.revision, health.staleness_s) == (UNREACHABLE, 1, 50.0)
    assert not health.reachable and not health.load_failing
    decision = ready(holder)
    assert decision.ready and decision.body() == {"status": "degraded", "registry": "unreachable",
                                                  "staleness_s": 50.0, "revision": 1}
    assert holder.current.bank == ("bank", ("tgt_ada",))  # still the last snapshot


def test_a_replica_that_cannot_load_what_the_registry_answers_is_not_ready_past_the_max_staleness(parts) -> None:
    registry, bank, clock, holder = parts
    reload(holder)
    registry.revision_now, bank.broken = 2, True  # others serve revision 2; this replica cannot build it
    clock.now += 1
    assert not reload(holder)
    assert holder.health().failure == LOAD_FAILED and holder.health().reachable and holder.health().load_failing
    assert ready(holder).ready and ready(holder).body()["status"] == "degraded"  # a passing failure is tolerated
    clock.now += MAX_STALENESS_S
    assert not reload(holder)
    decision = ready(holder)
    assert not decision.ready
    assert decision.body() == {"status": "unavailable", "reason": "registry", "registry": "load_failed",
                               "staleness_s": 31.0, "revision": 1}


def test_a_replica_recovers_to_ok_at_its_next_good_poll(parts) -> None:
    registry, bank, clock, holder = parts
    reload(holder)
    registry.revision_now, bank.broken = 2, True
    clock.now += 60
    reload(holder)
    assert not ready(holder).ready
    bank.broken = False
    assert reload(holder)
    assert ready(holder).body() == {"status": "ok", "registry": "current", "staleness_s": 0.0, "revision": 2}
    registry.down = refused()
    clock.now += 60
    reload(holder)
    assert ready(holder).body()["registry"] == UNREACHABLE
    registry.down = None
    assert reload(holder) and ready(holder).body() == {"status": "ok", "registry": "current", "staleness_s": 0.0,
                                                       "revision": 2}


def test_the_kind_of_failure_follows_the_latest_reload(parts) -> None:
    registry, bank, _, holder = parts
    reload(holder)
    registry.down = refused()
    reload(holder)
    assert holder.failure == UNREACHABLE
    registry.down, registry.revision_now, bank.broken = None, 2, True  # back, but this replica cannot load it
    reload(holder)
    assert holder.failure == LOAD_FAILED


def test_a_replica_that_never_loaded_a_snapshot_is_not_ready_whatever_the_failure(parts) -> None:
    registry, bank, _, holder = parts
    assert ready(holder).body() == {"status": "unavailable", "reason": "registry", "registry": LOADING}
    registry.down = refused()
    reload(holder)
    assert ready(holder).body() == {"status": "unavailable", "reason": "registry", "registry": UNREACHABLE}
    registry.down, bank.broken = None, True
    reload(holder)
    assert ready(holder).body() == {"status": "unavailable", "reason": "registry", "registry": LOAD_FAILED}


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("engine_alive, health, expected", [
    (True, RegistryHealth(7, 0.2, None), Readiness("ok", registry=CURRENT, staleness_s=0.2, revision=7)),
    (False, RegistryHealth(7, 0.2, None), Readiness("unavailable", reason="engine")),
    (True, None, Readiness("unavailable", reason="registry", registry=LOADING)),
    (True, RegistryHealth(-1, 5.0, None), Readiness("unavailable", reason="registry", registry=LOADING)),
    (True, RegistryHealth(-1, 5.0, UNREACHABLE), Readiness("unavailable", reason="registry", registry=UNREACHABLE)),
    (True, RegistryHealth(7, 42.14, UNREACHABLE),
     Readiness("degraded", registry=UNREACHABLE, staleness_s=42.1, revision=7)),
    (True, RegistryHealth(7, 3600.0, UNREACHABLE),  # however long: every replica is in the same place
     Readiness("degraded", registry=UNREACHABLE, staleness_s=3600.0, revision=7)),
    (True, RegistryHealth(7, 29.0, LOAD_FAILED),
     Readiness("degraded", registry=LOAD_FAILED, staleness_s=29.0, revision=7)),
    (True, RegistryHealth(7, 31.0, LOAD_FAILED),
     Readiness("unavailable", reason="registry", registry=LOAD_FAILED, staleness_s=31.0, revision=7)),
    (True, RegistryHealth(7, 31.0, None), Readiness("degraded", registry=STALE, staleness_s=31.0, revision=7)),
])
def test_the_readiness_rule(engine_alive: bool, health: RegistryHealth | None, expected: Readiness) -> None:
    assert readiness(engine_alive, health, MAX_STALENESS_S) == expected


# ---------------------------------------------------------------- over HTTP, and in the metrics


class AliveEngine:
    alive = True
    unfinished_requests = 0


def test_the_probes_answer_from_the_holder(parts) -> None:
    registry, bank, clock, holder = parts
    app = create_app(Settings(registry_max_staleness_s=MAX_STALENESS_S), Path("/nonexistent"), "model")
    app.state.engine, app.state.snapshots = AliveEngine(), holder
    client = TestClient(app)
    reload(holder)
    assert client.get("/health/ready").json() == {"status": "ok", "registry": "current", "staleness_s": 0.0,
                                                  "revision": 1}
    registry.down = refused()
    clock.now += 42.1
    reload(holder)
    probe = client.get("/health/ready")
    assert probe.status_code == 200
    assert probe.json() == {"status": "degraded", "registry": "unreachable", "staleness_s": 42.1, "revision": 1}
    registry.down, registry.revision_now, bank.broken = None, 2, True
    reload(holder)
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/live").status_code == 200 and client.get("/health").status_code == 200


def test_staleness_and_reachability_are_in_the_metrics_at_scrape_time(tmp_path: Path, monkeypatch) -> None:
    metrics = Metrics()
    control = ControlPlane.open(Settings(data_dir=tmp_path), metrics)
    clock = Clock()
    monkeypatch.setattr(control.snapshots, "_clock", clock)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    asyncio.run(control.start_snapshots())
    clock.now += 7
    assert (sample("lethe_registry_reachable"), sample("lethe_registry_load_failing")) == (1.0, 0.0)
    assert sample("lethe_registry_staleness_seconds") == 7.0

    def unreachable() -> int:
        raise refused()

    monkeypatch.setattr(control.registry.targets, "revision", unreachable)
    asyncio.run(control.snapshots.reload())
    assert (sample("lethe_registry_reachable"), sample("lethe_registry_load_failing")) == (0.0, 0.0)
    clock.now += 5
    assert sample("lethe_registry_staleness_seconds") == 12.0  # read at each scrape: it grows between reloads
