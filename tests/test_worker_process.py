"""`lethe worker` as its own process: it claims a queued classifier job from the shared database and completes it,
and a worker killed mid-job leaves a job that the next worker recovers (SPEC §8)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from demo.tofu_data import authors_of
from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER
from server.registry.database import make_engine, upgrade_database
from tests.conftest import LETHE_BIN


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_separate_worker_process_fits_a_queued_target_and_recovers_a_dead_workers_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    engine = make_engine(url)
    upgrade_database(engine)
    registry = Registry.open(engine)
    author = authors_of("forget01")[1]
    target = registry.targets.create(new_target(TargetCreate.model_validate({
        "name": "abilov", "aliases": [author.name],
        "forget": [{"question": i.question, "answer": i.answer} for i in author.items]}), ["eco"]))
    stale = registry.jobs.claim("worker-that-died", [FIT_CLASSIFIER])  # as if a worker crashed holding the job
    assert stale is not None
    env = {**os.environ, "LETHE_DATABASE_URL": url, "LETHE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "LETHE_JOB_STALE_AFTER_S": "5"}  # short, yet long enough that a busy worker's own heartbeat keeps its lease
    time.sleep(5.5)
    worker = subprocess.Popen([str(LETHE_BIN), "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: registry.targets.get(target.id).status != "preparing", timeout_s=300)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    shown = registry.targets.get(target.id)
    assert shown.status == "active", shown.jobs
    assert shown.jobs[0].attempts == 2  # the dead worker's attempt, then this worker's
    assert shown.classifier.threshold is not None and shown.classifier.heldout_recall >= 0.9
    assert worker.returncode == 0
