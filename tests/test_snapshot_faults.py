"""A snapshot reload loads per target: an artifact this replica cannot read degrades its own target (served by its
aliases, its other mechanisms and interim protection, reported) and blocks no other target, no new registration and
no delete; a replica starts with one; until a first snapshot is loaded, nothing is served (a real SQLite registry,
the real bank and mechanisms' serving halves, small fakes for the embedder)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from classifiers.prompt_classifier import PromptClassifierArtifact
from classifiers.types import Hit
from guards.base import ServingContext
from guards.mechanisms import INTERIM, MECHANISMS
from server.admin.protocol import TargetCreate
from server.admin.serving import AdminServing, new_target
from server.artifacts import ArtifactStore
from server.classifier_jobs import PROMPT_DIR, bank_factory, check_classifier_artifact, gate_bank_factory
from server.config import Settings
from server.control_plane import ControlPlane, mechanism_catalog
from server.errors import RegistryUnavailable
from server.jobs import JobContext, JobWorker
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.planner import Classification, Planner, RenderedPrompt
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER
from server.registry.database import make_engine, upgrade_database
from server.registry.snapshot import RegistrySnapshot, SnapshotHolder, interim_factory
from tests.pipeline_fakes import HI, FakeEngine, Holder, collect


class HashEmbedder:
    """Deterministic unit vectors: enough for heads to stack and calibrate without a model."""

    dim = 8
    model_id = "hash:8"

    def encode(self, texts):
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:32], dtype=np.uint8)[:8].astype(np.float32) + 1
                for t in texts]
        matrix = np.stack(rows) if rows else np.zeros((0, 8), np.float32)
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade_database(engine)
    return Registry.open(engine, mechanism_catalog(Settings()))


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


ALIASES = {"ada": "Ada Lindqvist", "bea": "Bea Okonkwo", "cai": "Cai Ferreira", "dov": "Dov Halloran"}


def register(registry: Registry, name: str, mechanisms: dict | None = None) -> str:
    alias = ALIASES[name]
    body = TargetCreate.model_validate({"name": name, "aliases": [alias],
                                        "mechanisms": mechanisms or {"eco": {"sigma": 1.0}},
                                        "forget": [{"question": f"Where was {alias} born?", "answer": "In Tromso."}]})
    return registry.targets.create(new_target(body, ["eco"])).id


def fit(registry: Registry, store: ArtifactStore) -> str:
    """Run the oldest classifier fit with a hand-made head; returns the artifact's digest."""
    digests: list[str] = []

    def handler(context: JobContext) -> dict:
        staging = context.artifacts.staging_dir()
        PromptClassifierArtifact(weights=np.zeros(8, np.float32), bias=-8.0, threshold=0.5, false_positive_rate=0.0,
                                 heldout_recall=1.0, n_pos=1, n_neg=1, aliases=list(context.target.aliases),
                                 embedder_id=HashEmbedder.model_id).save(staging / PROMPT_DIR)
        digests.append(context.artifacts.commit(staging))
        return {"status": "ready", "artifact": digests[-1], "threshold": 0.5}

    assert JobWorker(registry, store, {FIT_CLASSIFIER: handler}).run_once()
    return digests[0]


def holder(registry: Registry, store: ArtifactStore) -> SnapshotHolder:
    return SnapshotHolder(registry.targets, store.path, bank_factory(HashEmbedder, 0.005), poll_s=0.05,
                          interim=interim_factory(INTERIM, store.root), classifier_check=check_classifier_artifact)


def hit_ids(snapshot: RegistrySnapshot, text: str) -> list[str]:
    return [hit.target_id for hit in snapshot.bank.score([("user", text)]).hits]


def test_an_unreadable_classifier_artifact_degrades_its_target_and_blocks_no_other_change(
        registry: Registry, store: ArtifactStore) -> None:
    broken = register(registry, "ada")
    digest = fit(registry, store)
    fitted = register(registry, "bea")
    fit(registry, store)
    doomed = register(registry, "cai")
    shutil.rmtree(store.path(digest))  # the artifact is gone from this replica's disk
    added = register(registry, "dov")
    registry.targets.delete(doomed)
    snapshots = holder(registry, store)
    assert snapshots.refresh()
    snapshot = snapshots.current
    assert snapshot.revision == registry.targets.revision()  # the new target and the delete both applied
    assert set(snapshot.targets) == {broken, fitted, added}
    assert snapshot.targets[broken].status == "degraded" and not snapshot.targets[broken].classifier_ready
    assert "classifier" in snapshot.unreadable[broken] and list(snapshot.unreadable) == [broken]
    assert snapshot.bank.target_ids == [fitted]  # the readable head still serves
    assert hit_ids(snapshot, "Where was Ada Lindqvist born?") == [broken]  # detected by its aliases
    assert hit_ids(snapshot, "Tell me about Dov Halloran.") == [added]
    assert broken in snapshot.interim and snapshot.degraded == 1


def test_the_replica_reports_an_unreadable_target_as_degraded_with_why(registry: Registry,
                                                                       store: ArtifactStore) -> None:
    broken = register(registry, "ada")
    shutil.rmtree(store.path(fit(registry, store)))
    metrics = Metrics()
    control = ControlPlane.open(Settings(data_dir=store.root.parent), metrics)
    control.registry, control.snapshots = registry, holder(registry, store)
    asyncio.run(control.start_snapshots())
    assert metrics.registry.get_sample_value("lethe_targets_unreadable") == 1
    assert metrics.registry.get_sample_value("lethe_targets_degraded") == 1
    shown = AdminServing(registry, ["eco"], control.snapshots, None).get_target(broken)  # type: ignore[arg-type]
    assert shown.status == "degraded" and "cannot read" in shown.message and "classifier" in shown.message
    assert registry.targets.get(broken).status == "active"  # the registry itself is fine: this replica is not


def serving_halves(store: ArtifactStore) -> dict:
    context = ServingContext(tokenizer=None, artifact_path=store.path, artifacts_root=store.root, settings=None)
    return {m.name: m.serving(context) for m in MECHANISMS if m.name in ("guard", "uld")}


@pytest.mark.parametrize("mechanism, state", [("guard", {"artifact": "e" * 64}),
                                              ("uld", {"assistant": "f" * 64})])
def test_a_mechanism_whose_artifact_cannot_be_read_gives_way_to_interim_protection(
        registry: Registry, store: ArtifactStore, mechanism: str, state: dict) -> None:
    target_id = register(registry, "ada", {mechanism: {}})
    fit(registry, store)
    job = registry.jobs.claim("w", [kind for kind in ("guard_phrases", "uld_train")])
    assert registry.jobs.complete(job, state)  # published, but its artifact is not on this replica's disk
    snapshots = holder(registry, store)
    servings = serving_halves(store)
    snapshots.serve_with(servings)
    assert snapshots.refresh()
    snapshot = snapshots.current
    assert mechanism in snapshot.unreadable[target_id] and snapshot.targets[target_id].status == "degraded"
    planner = Planner([m for m in MECHANISMS if m.name in servings], servings, None, None, Metrics(),  # type: ignore
                      interim=INTERIM)
    prompt = RenderedPrompt(token_ids=[1, 2, 3], text="Where was Ada Lindqvist born?")
    plan = planner.plan(prompt, Classification(hits=(Hit(target_id, 1.0),)), snapshot, "req-1")
    assert plan.mechanisms == ("interim",)  # never refused, never unguarded


def test_a_replica_starts_with_an_unreadable_artifact(registry: Registry, store: ArtifactStore) -> None:
    register(registry, "ada")
    shutil.rmtree(store.path(fit(registry, store)))
    control = ControlPlane.open(Settings(data_dir=store.root.parent), Metrics())
    control.registry, control.snapshots = registry, holder(registry, store)
    asyncio.run(control.start_snapshots())
    assert control.snapshots.current.loaded and control.snapshots.current.revision == registry.targets.revision()


class Down:
    """A targets store whose database is unreachable."""

    def revision(self) -> int:
        raise ConnectionError("database down")

    snapshot_rows = revision


def test_a_replica_whose_first_load_fails_starts_unready_refuses_requests_and_loads_later(
        registry: Registry, store: ArtifactStore) -> None:
    metrics = Metrics()
    control = ControlPlane.open(Settings(data_dir=store.root.parent), metrics)
    snapshots = holder(registry, store)
    snapshots._targets = Down()  # type: ignore[assignment]
    control.snapshots = snapshots
    asyncio.run(control.start_snapshots())  # logged and counted, not raised
    assert not snapshots.current.loaded
    assert metrics.registry.get_sample_value("lethe_background_failures_total", {"task": "registry_reload"}) == 1
    pipeline = Pipeline(FakeEngine(), 5, Metrics(), registry=Holder(snapshots.current))  # type: ignore[arg-type]
    with pytest.raises(RegistryUnavailable):
        asyncio.run(collect(pipeline, HI, max_tokens=1))  # nothing is served before a snapshot is loaded
    snapshots._targets = registry.targets  # the database is back: the watch loads it
    assert snapshots.refresh() and snapshots.current.loaded


class PickyGate:
    """A mechanism's own gate whose artifact of one target cannot be read."""

    name = "ood"

    def __init__(self, unreadable: str) -> None:
        self.unreadable = unreadable

    def bank(self, directories: dict[str, Path], embedder: object) -> list[str]:
        if self.unreadable in directories:
            raise OSError(5, "Input/output error")
        return sorted(directories)


def test_an_unreadable_gate_artifact_degrades_only_its_target(registry: Registry, store: ArtifactStore) -> None:
    broken = register(registry, "ada", {"eco": {"sigma": 1.0}, "o3": {}})
    fit(registry, store)
    fine = register(registry, "bea", {"eco": {"sigma": 1.0}, "o3": {}})
    fit(registry, store)
    for target_id in (broken, fine):
        (store.path(registry.targets.record(target_id).classifier["artifact"]) / "ood").mkdir()
    mechanisms = [SimpleNamespace(name="o3", gate_detector=PickyGate(broken))]
    snapshots = SnapshotHolder(registry.targets, store.path, bank_factory(HashEmbedder, 0.005), poll_s=0.05,
                               gate_factory=gate_bank_factory(HashEmbedder, mechanisms),  # type: ignore[arg-type]
                               interim=interim_factory(INTERIM, store.root), classifier_check=check_classifier_artifact)
    assert snapshots.refresh()
    snapshot = snapshots.current
    assert snapshot.gates == {"ood": [fine]} and snapshot.bank.target_ids == [fine]
    assert snapshot.unreadable == {broken: {"classifier": "its gate: OSError: Input/output error"}}
    assert broken in snapshot.interim and hit_ids(snapshot, "Is Ada Lindqvist alive?") == [broken]


def test_a_forced_rebuild_that_fails_is_redone_at_the_next_poll(registry: Registry, store: ArtifactStore) -> None:
    register(registry, "ada")
    snapshots = holder(registry, store)
    assert snapshots.refresh()
    shared: list[int] = []
    serving = SimpleNamespace(share=lambda entries: shared.append(len(entries)) or "stack")
    snapshots.serve_with({"eco": serving})
    snapshots._targets = Down()  # type: ignore[assignment]
    assert not asyncio.run(snapshots.reload(force=True))  # the runtime's rebuild with the mechanisms' resources
    snapshots._targets = registry.targets
    assert snapshots.refresh()  # same revision, but the failed rebuild is redone
    assert shared == [1] and snapshots.current.shared == {"eco": "stack"}
