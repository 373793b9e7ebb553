"""The job worker and the snapshot holder against a real SQLite registry, with small fake job handlers."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import update

from guards.job_interface import GATE_LANE, MODEL_FILES, TRAINING_LANE, JobSpec
from guards.mechanisms import INTERIM
from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.artifacts import ArtifactStore
from server.classifier_jobs import CalibrationVectors, bank_factory, gate_bank_factory
from server.config import Settings
from server.control_plane import ControlPlane, job_lanes, make_workers
from server.jobs import JobContext, JobWorker
from server.metrics import Metrics
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER, MechanismCatalog
from server.registry.database import make_engine, upgrade_database
from server.registry.models import JobRow
from server.registry.snapshot import SnapshotHolder, interim_factory


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade_database(engine)
    return Registry.open(engine)


ALIAS = "Xavier Quill"


def add_target(registry: Registry, name: str = "t", mechanisms: dict | None = None) -> str:
    body = TargetCreate.model_validate({"name": name, "aliases": [ALIAS], "forget": [{"text": "x"}],
                                        "mechanisms": mechanisms})
    return registry.targets.create(new_target(body, ["eco"])).id


def writing_handler(context: JobContext) -> dict:
    staging = context.artifacts.staging_dir()
    (staging / "weights.txt").write_text(context.target.name)
    context.progress(0.5, "written")
    return {"status": "ready", "artifact": context.artifacts.commit(staging), "threshold": 0.5}


def test_worker_runs_a_job_and_publishes_a_content_addressed_artifact(registry: Registry, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "artifacts")
    target_id = add_target(registry)
    worker = JobWorker(registry, artifacts, {FIT_CLASSIFIER: writing_handler})
    assert worker.run_once() and not worker.run_once()
    shown = registry.targets.get(target_id)
    assert shown.status == "active" and shown.jobs[0].status == "succeeded"
    revision, records = registry.targets.snapshot_rows()
    digest = records[0].classifier["artifact"]
    assert (artifacts.path(digest) / "weights.txt").read_text() == "t"


def test_identical_artifacts_share_one_address(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    digests = []
    for _ in range(2):
        staging = artifacts.staging_dir()
        (staging / "a.bin").write_bytes(b"same")
        digests.append(artifacts.commit(staging))
    assert digests[0] == digests[1]
    assert [p.name for p in tmp_path.iterdir()] == [digests[0]]


def test_a_raising_handler_is_retried_then_failed(registry: Registry, tmp_path: Path) -> None:
    target_id = add_target(registry)

    def broken(_: JobContext) -> dict:
        raise RuntimeError("out of memory")

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: broken})
    while worker.run_once():
        pass
    job = registry.targets.get(target_id).jobs[0]
    assert job.status == "failed" and job.attempts == 3 and "out of memory" in job.error


def test_a_job_that_fails_half_way_leaves_no_staged_files(registry: Registry, tmp_path: Path) -> None:
    """A full disk (or any failure) mid-write: the partial staging directory goes with the failed attempt."""
    add_target(registry)
    store = ArtifactStore(tmp_path / "artifacts")

    def disk_full(context: JobContext) -> dict:
        (context.artifacts.staging_dir() / "heads.npy").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    worker = JobWorker(registry, store, {FIT_CLASSIFIER: disk_full})
    while worker.run_once():
        pass
    assert list(store.root.iterdir()) == []


def test_deleting_a_target_stops_its_running_job(registry: Registry, tmp_path: Path) -> None:
    target_id = add_target(registry)
    started, finished = threading.Event(), threading.Event()
    outcome: list[str] = []

    def slow(context: JobContext) -> dict:
        started.set()
        try:
            for step in range(100):
                time.sleep(0.05)
                context.progress(step / 100, "working")
        except BaseException as exc:
            outcome.append(type(exc).__name__)
            raise
        finally:
            finished.set()
        return {"status": "ready", "artifact": "0" * 64}

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: slow})
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert started.wait(10)
    registry.targets.delete(target_id)
    assert finished.wait(10)
    thread.join()
    assert outcome == ["JobCancelled"]


def test_a_job_between_progress_reports_stops_at_its_next_check_once_the_heartbeat_finds_it_cancelled(
        registry: Registry, tmp_path: Path) -> None:
    """A calibration runs hundreds of forward passes between two progress reports; it calls ``check_cancelled``
    before each (``guards.probe.ModelProbe``), which reads what the heartbeat last found, not the database."""
    target_id = add_target(registry)
    started, finished = threading.Event(), threading.Event()
    outcome: list[tuple[str, float]] = []

    def passes(context: JobContext) -> dict:
        started.set()
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:  # no progress report at all
                time.sleep(0.01)
                context.check_cancelled()
        except BaseException as exc:
            outcome.append((type(exc).__name__, time.monotonic()))
            raise
        finally:
            finished.set()
        return {"status": "ready", "artifact": "0" * 64}

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: passes}, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert started.wait(10)
    registry.targets.delete(target_id)
    deleted_at = time.monotonic()
    assert finished.wait(10)
    thread.join()
    assert [name for name, _ in outcome] == ["JobCancelled"]
    assert outcome[0][1] - deleted_at < 2  # within a few heartbeats, not at the end of the 20 s


def test_a_job_whose_target_was_deleted_is_cancelled_not_failed(registry: Registry, tmp_path: Path) -> None:
    target_id = add_target(registry)
    job_id = registry.targets.get(target_id).jobs[0].id
    claimed = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    registry.targets.delete(target_id)
    with registry.database.transaction() as session:  # as if the delete raced the claim: the job is still running
        session.execute(update(JobRow).where(JobRow.id == job_id).values(status="queued"))
    calls: list[str] = []
    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: lambda c: calls.append("ran") or {}})
    assert claimed is not None and worker.run_once()
    assert calls == [] and registry.jobs.get(job_id).status == "cancelled"


def test_snapshot_holder_swaps_when_the_revision_moves(registry: Registry, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    built: list[dict] = []
    holder = SnapshotHolder(registry.targets, artifacts.path,
                            lambda dirs, aliases, negatives: built.append((dirs, aliases)) or sorted(dirs),
                            poll_s=0.1)
    assert holder.refresh() and holder.current.bank is None and holder.current.empty
    target_id = add_target(registry)
    assert holder.refresh() and built[-1] == ({}, {target_id: [ALIAS]})  # served from its registration, by its aliases
    JobWorker(registry, artifacts, {FIT_CLASSIFIER: writing_handler}).run_once()
    old = holder.current
    assert holder.refresh()
    assert holder.current.revision == registry.targets.revision() and len(holder.current.targets) == 1
    assert list(built[-1][0]) == [target_id] and built[-1][1] == {target_id: [ALIAS]}  # now its fitted classifier too
    assert old.bank == [] and not old.targets[target_id].classifier_ready  # in-flight requests keep their snapshot
    assert not holder.refresh()  # nothing changed: no rebuild
    assert len(built) == 2


class ListingGate:
    """A mechanism's own gate whose "bank" lists the targets it was built for."""

    name = "ood"

    def bank(self, directories: dict[str, Path], embedder: object) -> list[str]:
        return sorted(directories)


def gate_fitting_handler(context: JobContext) -> dict:
    """Like the classifier job: the gate's subdirectory only for targets enabling the gated mechanism."""
    staging = context.artifacts.staging_dir()
    (staging / "weights.txt").write_text(context.target.name)
    if "o3" in context.target.mechanisms:
        (staging / ListingGate.name).mkdir()
    return {"status": "ready", "artifact": context.artifacts.commit(staging), "threshold": 0.5}


def test_the_snapshot_stacks_a_mechanisms_own_gate_only_for_targets_that_enable_it(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gates.db'}")
    upgrade_database(engine)
    registry = Registry.open(engine, MechanismCatalog(classifier_fitted_gates=frozenset({"o3"})))
    artifacts = ArtifactStore(tmp_path / "artifacts")
    gated = add_target(registry, "gated", {"o3": {}, "eco": {}})
    add_target(registry, "plain", {"eco": {}})
    worker = JobWorker(registry, artifacts, {FIT_CLASSIFIER: gate_fitting_handler})
    while worker.run_once():
        pass
    mechanisms = [SimpleNamespace(name="eco", gate_detector=None),
                  SimpleNamespace(name="o3", gate_detector=ListingGate())]
    holder = SnapshotHolder(registry.targets, artifacts.path, lambda dirs, aliases, negatives: sorted(dirs),
                            poll_s=0.1,
                            gate_factory=gate_bank_factory(lambda: None, mechanisms))  # type: ignore[arg-type]
    holder.refresh()
    assert len(holder.current.bank) == 2 and holder.current.gates == {"ood": [gated]}


# ---- no unprotected window: every target served from its registration, gate jobs in their own lane -------------


class StubEmbedder:
    """The bank's embedding model where no head needs it: alias-only targets are found without embedding."""

    dim = 4
    model_id = "stub:4"

    def encode(self, texts):
        raise AssertionError("an alias-only bank must not embed")


def add_named_target(registry: Registry, name: str, alias: str, mechanisms: dict | None = None) -> str:
    forget = [{"question": f"Where was {alias} born?", "answer": "In Reykjavik."}]
    body = TargetCreate.model_validate({"name": name, "aliases": [alias], "mechanisms": mechanisms, "forget": forget})
    return registry.targets.create(new_target(body, ["guard"])).id


def alias_snapshots(registry: Registry, tmp_path: Path) -> SnapshotHolder:
    """The snapshot holder ``lethe serve`` runs, with the real bank and interim protection, and a stub embedder."""
    return SnapshotHolder(registry.targets, ArtifactStore(tmp_path).path, bank_factory(StubEmbedder, 0.005),
                          poll_s=0.1,
                          interim=interim_factory(INTERIM, tmp_path))


def test_a_new_target_is_detected_and_protected_from_the_revision_that_registers_it_until_the_one_that_deletes_it(
        registry: Registry, tmp_path: Path) -> None:
    holder = alias_snapshots(registry, tmp_path)
    target_id = add_named_target(registry, "basil", "Basil Mahfouz Al-Kuwaiti")
    assert holder.refresh()
    snapshot = holder.current
    assert snapshot.revision == registry.targets.revision() and list(snapshot.targets) == [target_id]
    hits = snapshot.bank.score([("user", "Where was Basil Al-Kuwaiti born?")]).hits
    assert [hit.target_id for hit in hits] == [target_id]
    assert "reykjavik" in snapshot.interim[target_id].phrases_for("Where was Basil Al-Kuwaiti born?")
    registry.targets.delete(target_id)
    assert holder.refresh()  # the next poll: within LETHE_REGISTRY_POLL_S of the delete
    assert holder.current.targets == {} and holder.current.bank is None and holder.current.interim == {}
    assert snapshot.bank.score([("user", "Basil Al-Kuwaiti?")]).hits  # a request already in flight keeps its snapshot


def test_a_target_whose_classifier_cannot_be_fitted_stays_served_degraded(registry: Registry, tmp_path: Path) -> None:
    holder = alias_snapshots(registry, tmp_path)
    target_id = add_named_target(registry, "basil", "Basil Mahfouz Al-Kuwaiti")

    def broken(_: JobContext) -> dict:
        raise RuntimeError("no negatives")

    worker = JobWorker(registry, ArtifactStore(tmp_path), {FIT_CLASSIFIER: broken})
    while worker.run_once():
        pass
    assert registry.targets.get(target_id).status == "degraded"
    holder.refresh()
    assert holder.current.degraded == 1 and target_id in holder.current.interim
    assert [hit.target_id for hit in holder.current.bank.score([("user", "Basil Al-Kuwaiti?")]).hits] == [target_id]


def test_a_gate_job_is_claimed_in_the_gate_lane_while_the_training_lane_runs_an_older_job(tmp_path: Path) -> None:
    training = SimpleNamespace(name="uld", jobs=(JobSpec("uld_train", MODEL_FILES, lambda resources: None),))
    engine = make_engine(f"sqlite:///{tmp_path / 'lanes.db'}")
    upgrade_database(engine)
    registry = Registry.open(engine, MechanismCatalog(frozenset({"uld"}), lambda name, options: ["uld_train"],
                                                      {"uld_train": "uld"}))
    started, release = threading.Event(), threading.Event()

    def train(context: JobContext) -> dict:
        started.set()
        assert release.wait(30)
        return {"assistant": "0" * 64}

    settings = Settings(data_dir=tmp_path, _env_file=None)
    gate, trainer = make_workers(settings, registry, {FIT_CLASSIFIER: writing_handler, "uld_train": train},
                                 mechanisms=[training])  # type: ignore[list-item]
    assert (gate.lane, gate.kinds, trainer.lane, trainer.kinds) == ("gate", [FIT_CLASSIFIER], "training", ["uld_train"])
    first = add_named_target(registry, "first", "Nikolai Abilov", {"uld": {}})
    assert gate.run_once()  # the first target's classifier
    running = threading.Thread(target=trainer.run_once)
    running.start()
    assert started.wait(10)  # its ten-minute training now holds the training lane
    second = add_named_target(registry, "second", "Basil Mahfouz Al-Kuwaiti", {"uld": {}})
    assert gate.run_once() and registry.targets.get(second).classifier.status == "ready"
    assert registry.targets.get(first).jobs[1].status == "running"
    release.set()
    running.join()
    assert registry.targets.get(first).status == "active"


def test_a_gate_lane_job_cannot_need_the_model() -> None:
    with pytest.raises(ValueError, match="training lane"):
        JobSpec("train", MODEL_FILES, lambda resources: None, lane=GATE_LANE)
    assert job_lanes()[FIT_CLASSIFIER] == GATE_LANE == job_lanes()["guard_phrases"]
    assert {job_lanes()[kind] for kind in ("eco_calibrate", "uld_train", "o3_train")} == {TRAINING_LANE}


def test_the_embedded_server_runs_one_worker_thread_per_lane(tmp_path: Path) -> None:
    control = ControlPlane.open(Settings(data_dir=tmp_path, _env_file=None), Metrics())
    control.start_worker(SimpleNamespace(tokenizer=None), tmp_path)  # type: ignore[arg-type]
    try:
        assert [(worker.lane, worker.kinds) for worker in control.workers] == [
            ("gate", [FIT_CLASSIFIER, "guard_phrases"]), ("training", ["eco_calibrate", "guard_calibrate", "o3_train", "uld_train"])]
        threads = {thread.name for thread in threading.enumerate()}
        assert {"lethe-job-worker-gate", "lethe-job-worker-training"} <= threads
    finally:
        asyncio.run(control.stop())
    assert not any(thread.name.startswith("lethe-job-worker") for thread in threading.enumerate())


def test_the_gate_calibration_embeds_each_negative_once_per_replica() -> None:
    """A snapshot is rebuilt at every registry revision; re-embedding the ~350 calibration negatives each time once
    held a registration 6.5 s past the propagation budget."""
    calls: list[list[str]] = []

    class Counting:
        def encode(self, texts):
            calls.append(list(texts))
            return np.ones((len(texts), 4), np.float32)

    vectors = CalibrationVectors(lambda: Counting())  # type: ignore[arg-type, return-value]
    assert vectors.encode(["a", "b"]).shape == (2, 4)
    assert vectors.encode(["b", "a", "c", "a"]).shape == (4, 4)
    assert calls == [["a", "b"], ["c"]]
