"""The job worker and the snapshot holder against a real SQLite registry, with small fake job handlers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.artifacts import ArtifactStore
from server.jobs import JobContext, JobWorker
from server.registry.database import make_engine, upgrade_database
from server.registry.snapshot import SnapshotHolder
from sqlalchemy import update

from server.registry.models import JobRow
from server.registry.store import FIT_CLASSIFIER, RegistryStore


@pytest.fixture
def store(tmp_path: Path) -> RegistryStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade_database(engine)
    return RegistryStore(engine)


def add_target(store: RegistryStore, name: str = "t") -> str:
    body = TargetCreate.model_validate({"name": name, "aliases": ["X"], "forget": [{"text": "x"}]})
    return store.create_target(new_target(body, ["eco"])).id


def writing_handler(context: JobContext) -> dict:
    staging = context.artifacts.staging_dir()
    (staging / "weights.txt").write_text(context.target.name)
    context.progress(0.5, "written")
    return {"status": "ready", "artifact": context.artifacts.commit(staging), "threshold": 0.5}


def test_worker_runs_a_job_and_publishes_a_content_addressed_artifact(store: RegistryStore, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path / "artifacts")
    target_id = add_target(store)
    worker = JobWorker(store, artifacts, {FIT_CLASSIFIER: writing_handler})
    assert worker.run_once() and not worker.run_once()
    shown = store.get_target(target_id)
    assert shown.status == "active" and shown.jobs[0].status == "succeeded"
    revision, records = store.snapshot_rows()
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


def test_a_raising_handler_is_retried_then_failed(store: RegistryStore, tmp_path: Path) -> None:
    target_id = add_target(store)

    def broken(_: JobContext) -> dict:
        raise RuntimeError("out of memory")

    worker = JobWorker(store, ArtifactStore(tmp_path), {FIT_CLASSIFIER: broken})
    while worker.run_once():
        pass
    job = store.get_target(target_id).jobs[0]
    assert job.status == "failed" and job.attempts == 3 and "out of memory" in job.error


def test_deleting_a_target_stops_its_running_job(store: RegistryStore, tmp_path: Path) -> None:
    target_id = add_target(store)
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

    worker = JobWorker(store, ArtifactStore(tmp_path), {FIT_CLASSIFIER: slow})
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert started.wait(10)
    store.delete_target(target_id)
    assert finished.wait(10)
    thread.join()
    assert outcome == ["JobCancelled"]


def test_a_job_whose_target_was_deleted_is_cancelled_not_failed(store: RegistryStore, tmp_path: Path) -> None:
    target_id = add_target(store)
    job_id = store.get_target(target_id).jobs[0].id
    claimed = store.claim_job("w1", [FIT_CLASSIFIER])
    store.delete_target(target_id)
    with store._sessions.begin() as session:  # as if the delete raced the claim: the job is still running
        session.execute(update(JobRow).where(JobRow.id == job_id).values(status="queued"))
    calls: list[str] = []
    worker = JobWorker(store, ArtifactStore(tmp_path), {FIT_CLASSIFIER: lambda c: calls.append("ran") or {}})
    assert claimed is not None and worker.run_once()
    assert calls == [] and store.get_job(job_id).status == "cancelled"


def test_snapshot_holder_swaps_when_the_revision_moves(store: RegistryStore, tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    built: list[dict] = []
    holder = SnapshotHolder(store, artifacts.path, lambda dirs: built.append(dirs) or sorted(dirs), poll_s=0.1)
    assert holder.refresh() and holder.current.bank is None and holder.current.empty
    add_target(store)
    JobWorker(store, artifacts, {FIT_CLASSIFIER: writing_handler}).run_once()
    old = holder.current
    assert holder.refresh()
    assert holder.current.revision == store.revision() and len(holder.current.targets) == 1
    assert old.targets == {}  # a request holding the old snapshot keeps seeing it unchanged
    assert not holder.refresh()  # nothing changed: no rebuild
    assert len(built) == 1
