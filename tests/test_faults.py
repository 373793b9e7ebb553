"""Faults, each survived through the real engine on a real PostgreSQL (the production shape: replicas and workers on one
database, artifacts on a shared volume):

- PostgreSQL stopped and restarted under load: serving goes on from the last snapshot (flagged prompts still
  guarded), admin writes get a clear 503 with ``Retry-After``, and afterwards nothing committed is lost, nothing
  refused was half-committed, every request served during the outage is audited, and new changes are served again.
- The artifacts disk full during a job: the job fails cleanly (no staged leftovers, no half-written artifact), the
  target stays enforced by its aliases, serving goes on.
- ``kill -9`` of the server mid-stream and mid-training: the client's stream ends at once (no hang), the committed
  registry is intact, and the training job is recovered by a ``lethe worker``; that worker killed mid-training in
  turn, the next worker recovers the job again.

The artifacts live on a small tmpfs so the disk can really fill (mounting needs root, as in CI; elsewhere that one
test is skipped). ``LETHE_JOB_STALE_AFTER_S`` is short so recovery is seen within seconds.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.stream_load import CUT, DONE, run_streams
from server.artifacts import directory_digest
from server.errors import NotFound
from server.registry import Registry
from server.registry.database import make_engine
from tests.conftest import API_KEY, LETHE_BIN, RunningServer, admin_headers, start_server, stop_server
from tests.postgres import PostgresServer, postgres_server
from tests.unlearning import FORGET01, target_body

STALE_AFTER_S = 15
OUTAGE_S = 8.0
DISK_BYTES = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def artifacts_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bool]]:
    """(the artifacts directory, whether it is a small disk of its own that can be filled)."""
    directory = tmp_path_factory.mktemp("artifacts-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    try:
        yield directory, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fault_env(postgres: PostgresServer, artifacts: Path, **extra: str) -> dict[str, str]:
    return {"LETHE_DATABASE_URL": postgres.url, "LETHE_ARTIFACTS_DIR": str(artifacts),
            "LETHE_JOB_STALE_AFTER_S": str(STALE_AFTER_S), **extra}


@pytest.fixture(scope="module")
def first_server(postgres: PostgresServer, artifacts_disk: tuple[Path, bool], tiny_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("faults") / "first.log",
                          fault_env(postgres, artifacts_disk[0]))
    yield server
    stop_server(server)


def admin_client(server: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=f"{server.base_url}/admin/v1", headers=admin_headers(), timeout=30)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def register(admin: httpx.Client, author, mechanisms: dict, name: str | None = None) -> str:
    body = target_body(author, mechanisms)
    if name is not None:
        body["name"] = name
    created = admin.post("/targets", json=body)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def served(admin: httpx.Client, target_id: str, statuses: tuple[str, ...] = ("active",)) -> bool:
    target = admin.get(f"/targets/{target_id}").json()
    summary = admin.get("/registry").json()
    return target["status"] in statuses and summary["serving_revision"] >= summary["revision"]


def ask(server: RunningServer, model: str, question: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60, json={"model": model, "messages": [{"role": "user", "content": question}],
                                        "max_tokens": 16})


def model_of(server: RunningServer) -> str:
    return httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()[
        "data"][0]["id"]


def naming_question(author) -> str:
    return next(item.question for item in author.items if author.name in item.question)


# ---------------------------------------------------------------- the database goes away


def test_postgres_outage_under_load_keeps_serving_refuses_admin_writes_and_loses_nothing(
        first_server: RunningServer, postgres: PostgresServer) -> None:
    author = FORGET01[0]
    model = model_of(first_server)
    with admin_client(first_server) as admin:
        target_id = register(admin, author, {"guard": {}}, name="fault-outage")
        wait_until(lambda: served(admin, target_id), 300, "the target is served")
        prompts = [(naming_question(author), True), ("Name three colours.", False)]
        load: dict = {}
        since = time.time()
        driver = threading.Thread(target=lambda: load.setdefault("report", asyncio.run(
            run_streams(first_server.base_url, API_KEY, model, prompts, 8, OUTAGE_S + 8))))
        driver.start()
        time.sleep(3)
        postgres.stop("fast")
        try:
            refused = admin.post("/targets", json={**target_body(FORGET01[1], {"guard": {}}),
                                                   "name": "fault-during-outage"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "registry_unavailable"
            assert int(refused.headers["Retry-After"]) > 0
            assert admin.get("/targets").status_code == 503
            assert httpx.get(f"{first_server.base_url}/health").status_code == 200
            assert httpx.get(f"{first_server.base_url}/metrics").status_code == 200
            during = ask(first_server, model, naming_question(author))
            assert during.status_code == 200, during.text
            time.sleep(OUTAGE_S)
        finally:
            postgres.start()
        driver.join()
        report = load["report"]
        assert not report.server_errors and report.by_ending.get(CUT, 0) == 0, (report.by_status, report.by_ending)
        assert report.by_ending.get(DONE, 0) >= 8

        after = wait_until(lambda: (response := admin.post("/targets", json={
            **target_body(FORGET01[1], {"guard": {}}), "name": "fault-after-outage"})).status_code == 201
            and response, 60, "admin writes work again once PostgreSQL is back")
        names = {target["name"] for target in admin.get("/targets").json()["data"]}
        assert {"fault-outage", "fault-after-outage"} <= names and "fault-during-outage" not in names
        wait_until(lambda: served(admin, after.json()["id"]), 300, "a change after the outage is served")

        ids = {o.response_id for o in report.outcomes if o.ended == DONE} | {during.json()["id"]}
        audited = wait_until(lambda: ids <= {r["request_id"] for r in admin.get(
            "/audit", params={"since": since, "limit": 10_000}).json()["data"]}, 60,
            "every request served during the outage is audited once the database is back")
        assert audited
        assert admin.delete(f"/targets/{after.json()['id']}").status_code == 200


def readiness(server: RunningServer) -> dict:
    """The body of ``/health/ready``, which must answer 200 (a registry outage never takes a replica out)."""
    probe = httpx.get(f"{server.base_url}/health/ready", timeout=10)
    assert probe.status_code == 200, probe.text
    return probe.json()


def registry_gauge(server: RunningServer, name: str) -> float:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE).group(1))


def test_a_postgres_outage_keeps_the_replica_ready_and_degraded_while_its_registry_staleness_grows(
        first_server: RunningServer, postgres: PostgresServer) -> None:
    wait_until(lambda: readiness(first_server)["registry"] == "current", 60, "the snapshot is current")
    assert registry_gauge(first_server, "lethe_registry_reachable") == 1
    postgres.stop("fast")
    try:
        down = wait_until(lambda: (body := readiness(first_server))["registry"] == "unreachable" and body, 30,
                          "the replica sees the registry unreachable")
        assert down["status"] == "degraded" and down["revision"] >= 0, down
        assert registry_gauge(first_server, "lethe_registry_reachable") == 0
        assert registry_gauge(first_server, "lethe_registry_load_failing") == 0
        before = registry_gauge(first_server, "lethe_registry_staleness_seconds")
        time.sleep(4)
        later = readiness(first_server)
        assert later["registry"] == "unreachable" and later["staleness_s"] >= down["staleness_s"] + 3, later
        assert registry_gauge(first_server, "lethe_registry_staleness_seconds") >= before + 3
    finally:
        postgres.start()
    back = wait_until(lambda: (body := readiness(first_server))["status"] == "ok" and body, 60,
                      "the replica confirms its snapshot once PostgreSQL is back")
    assert back["registry"] == "current" and back["staleness_s"] < 5, back
    assert registry_gauge(first_server, "lethe_registry_reachable") == 1
    assert registry_gauge(first_server, "lethe_registry_staleness_seconds") < 5


# ---------------------------------------------------------------- the artifacts disk fills up

ENDED = ("failed", "cancelled", "succeeded")


def test_a_full_artifacts_disk_fails_the_job_cleanly_and_the_target_stays_enforced(
        first_server: RunningServer, artifacts_disk: tuple[Path, bool]) -> None:
    artifacts, mounted = artifacts_disk
    if not mounted:
        pytest.skip("mounting a small tmpfs for the artifacts needs root")
    author = FORGET01[1]
    before = {path.name for path in artifacts.iterdir()}
    filler = artifacts / ".filler"
    fill(filler)
    try:
        with admin_client(first_server) as admin:
            target_id = register(admin, author, {"guard": {}}, name="fault-disk-full")
            # The target turns degraded as soon as its first job fails; its other job may still be running then.
            target = wait_until(lambda: (shown := admin.get(f"/targets/{target_id}").json())["status"]
                                in ("degraded", "failed") and all(job["status"] in ENDED for job in shown["jobs"])
                                and shown, 120, "the jobs fail on the full disk and every job ends")
            assert all(job["status"] in ENDED for job in target["jobs"]), target["jobs"]
            assert any("No space left" in (job["error"] or "") for job in target["jobs"]), target["jobs"]
            left = {path.name for path in artifacts.iterdir()} - before - {filler.name}
            assert left == set(), f"left on the full disk: {left}"
            for artifact in artifacts.iterdir():
                if len(artifact.name) == 64:
                    assert directory_digest(artifact) == artifact.name, f"{artifact.name} is not whole"
            wait_until(lambda: served(admin, target_id, ("degraded", "failed")), 30, "the failed target is served")
            reply = ask(first_server, model_of(first_server), naming_question(author))
            assert reply.status_code == 200, reply.text
            record = wait_until(lambda: next((r for r in admin.get("/audit", params={"limit": 50}).json()["data"]
                                              if r["request_id"] == reply.json()["id"]), None), 10, "audited")
            assert target_id in record["targets"], "the target's aliases no longer enforce it"
            assert admin.delete(f"/targets/{target_id}").status_code == 200
    finally:
        filler.unlink(missing_ok=True)


def fill(path: Path) -> None:
    """Write until the disk is full."""
    chunk = b"\0" * (1024 * 1024)
    with path.open("wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


# ---------------------------------------------------------------- processes killed


def test_kill_9_of_server_mid_stream_and_mid_training_then_of_a_worker_mid_training_loses_nothing(
        first_server: RunningServer, postgres: PostgresServer, artifacts_disk: tuple[Path, bool],
        tiny_model_dir: Path, tmp_path: Path) -> None:
    artifacts = artifacts_disk[0]
    registry = Registry.open(make_engine(postgres.url))
    model = model_of(first_server)
    with admin_client(first_server) as admin:
        guarded_id = register(admin, FORGET01[0], {"guard": {}}, name="fault-kill-guarded")
        wait_until(lambda: served(admin, guarded_id), 300, "the guarded target is served")
        training_id = register(admin, FORGET01[1], {"uld": {}}, name="fault-training")
        job_id = next(job["id"] for job in admin.get(f"/targets/{training_id}").json()["jobs"]
                      if job["kind"] != "fit_classifier")
        wait_until(lambda: admin.get(f"/jobs/{job_id}").json()["status"] == "running", 300, "training started")
        committed = {target["id"] for target in admin.get("/targets").json()["data"]}

    with httpx.stream("POST", f"{first_server.base_url}/v1/chat/completions",
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                      json={"model": model, "stream": True, "max_tokens": 400, "ignore_eos": True,
                            "messages": [{"role": "user", "content": "Tell me a long story."}]}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.killpg(first_server.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(httpx.TransportError):
            for _ in lines:
                pass
        assert time.monotonic() - killed_at < 10, "the stream hung after the server died"
    first_server.process.wait()

    assert {target.id for target in registry.targets.listing().targets} == committed, "a committed target was lost"
    assert registry.jobs.get(job_id).status == "running"  # stale: its worker is gone

    server = start_server(tiny_model_dir, tmp_path / "second.log",
                          fault_env(postgres, artifacts, LETHE_EMBEDDED_WORKER="false"))
    workers: list[subprocess.Popen] = []
    try:
        for expected_attempt in (2, 3):
            log = tmp_path / f"worker{expected_attempt}.log"
            workers.append(start_worker(postgres, artifacts, tiny_model_dir, log))
            try:
                wait_until(lambda: (job := registry.jobs.get(job_id)).status == "running"
                           and job.attempts == expected_attempt, 4 * STALE_AFTER_S + 120,
                           f"a worker recovers the training job (attempt {expected_attempt})")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the job: {registry.jobs.get(job_id)}; "
                                     f"the worker's log ends: {log.read_text()[-3000:]}") from None
            if expected_attempt == 2:
                os.killpg(workers[-1].pid, signal.SIGKILL)
                workers[-1].wait()
        with admin_client(server) as admin:
            assert {target["id"] for target in admin.get("/targets").json()["data"]} == committed
            reply = ask(server, model_of(server), naming_question(FORGET01[0]))
            assert reply.status_code == 200
            record = wait_until(lambda: next((r for r in admin.get("/audit", params={"limit": 50}).json()["data"]
                                              if r["request_id"] == reply.json()["id"]), None), 10, "audited")
            assert guarded_id in record["targets"]
            worker_log = tmp_path / "worker3.log"
            recovered = registry.jobs.get(job_id)
            assert recovered.status == "running", (
                f"the recovered training ended before its target was deleted: {recovered}; "
                f"the worker's log ends: {worker_log.read_text()[-3000:]}")
            for target_id in committed:
                deleted = admin.delete(f"/targets/{target_id}")
                assert deleted.status_code == 200, deleted.text
        assert job_ended(registry, job_id), registry.jobs.get(job_id)
        try:  # the worker notices at its next progress report or heartbeat, and stops
            wait_until(lambda: f'"job.cancelled", "job_id": "{job_id}"' in worker_log.read_text(), 60,
                       "deleting the target stops the recovered training")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the worker's log ends: {worker_log.read_text()[-3000:]}") from None
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(60)
        stop_server(server)


def job_ended(registry: Registry, job_id: str) -> bool:
    try:
        return registry.jobs.get(job_id).status == "cancelled"
    except NotFound:  # erased with its target
        return True


def start_worker(postgres: PostgresServer, artifacts: Path, model_dir: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **fault_env(postgres, artifacts), "LETHE_LOG_LEVEL": "INFO"}
    return subprocess.Popen([str(LETHE_BIN), "worker", "--model", str(model_dir)], env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
