"""Several serving replicas on one registry database converge on every change within 2 s, and nothing committed is
lost when a replica is killed mid-write (SQLite file and a real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, admin_headers, start_server, start_servers, stop_server
from tests.postgres import running_postgres

CONVERGENCE_BUDGET_S = 2.0


def serving_revision(server: RunningServer) -> int:
    return httpx.get(f"{server.base_url}/admin/v1/registry", headers=admin_headers(), timeout=10).json()[
        "serving_revision"]


def measure_propagation(writer: RunningServer, reader: RunningServer, name: str) -> float:
    """Create a target on ``writer``; seconds until ``reader`` serves the new revision."""
    created = httpx.post(f"{writer.base_url}/admin/v1/targets", headers=admin_headers(), timeout=30,
                         json={"name": name, "aliases": [name], "forget": [{"text": f"Facts about {name}."}],
                               "mechanisms": {"guard": {}}})
    assert created.status_code == 201, created.text
    committed_at, revision = time.monotonic(), created.json()["revision"]
    while serving_revision(reader) < revision:
        if time.monotonic() - committed_at > 10:
            raise AssertionError(f"replica still below revision {revision} after 10 s")
        time.sleep(0.05)
    return time.monotonic() - committed_at


def hammer_then_kill(victim: RunningServer, survivor: RunningServer, prefix: str) -> None:
    """Send creates to ``victim`` from several threads, kill -9 it mid-way; every 201 must be in the database."""
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        with httpx.Client(base_url=victim.base_url, headers=admin_headers(), timeout=10) as session:
            for i in range(1000):
                if stop.is_set():
                    return
                name = f"{prefix}-{worker}-{i}"
                try:
                    response = session.post("/admin/v1/targets", json={"name": name, "aliases": [name],
                                                                     "forget": [{"text": name}],
                                                                     "mechanisms": {"guard": {}}})
                except httpx.TransportError:
                    return
                if response.status_code == 201:
                    acknowledged.append(response.json()["id"])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(victim.process.pid, signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join()
    victim.process.wait()
    assert len(acknowledged) >= 20
    stored = {t["id"] for t in httpx.get(f"{survivor.base_url}/admin/v1/targets", headers=admin_headers(),
                                         timeout=30).json()["data"]}
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged targets lost"


@pytest.fixture(scope="module")
def sqlite_replica(lethe_server: RunningServer, tiny_model_dir: Path, tmp_path_factory) -> Iterator[RunningServer]:
    """A second replica sharing the session server's SQLite file and artifacts (no worker of its own)."""
    log = tmp_path_factory.mktemp("replica") / "server.log"
    server = start_server(tiny_model_dir, log, {"LETHE_DATA_DIR": lethe_server.env["LETHE_DATA_DIR"],
                                                "LETHE_EMBEDDED_WORKER": "false"})
    yield server
    stop_server(server)


def test_sqlite_replicas_converge_within_two_seconds(lethe_server: RunningServer,
                                                     sqlite_replica: RunningServer) -> None:
    try:
        delays = [measure_propagation(lethe_server, sqlite_replica, f"sqlite-propagation-{i}") for i in range(3)]
        delays += [measure_propagation(sqlite_replica, lethe_server, f"sqlite-propagation-back-{i}") for i in range(2)]
        assert max(delays) < CONVERGENCE_BUDGET_S, delays
    finally:  # later modules need an empty registry, pass or fail
        for target in httpx.get(f"{lethe_server.base_url}/admin/v1/targets", headers=admin_headers()).json()["data"]:
            if target["name"].startswith("sqlite-propagation"):
                httpx.delete(f"{lethe_server.base_url}/admin/v1/targets/{target['id']}", headers=admin_headers())


def test_sqlite_kill_9_during_writes_loses_nothing_committed(lethe_server: RunningServer,
                                                              sqlite_replica: RunningServer) -> None:
    hammer_then_kill(sqlite_replica, lethe_server, "sqlite-kill")
    for target in httpx.get(f"{lethe_server.base_url}/admin/v1/targets", headers=admin_headers()).json()["data"]:
        if target["name"].startswith("sqlite-kill"):
            httpx.delete(f"{lethe_server.base_url}/admin/v1/targets/{target['id']}", headers=admin_headers())


def test_postgres_replicas_converge_and_survive_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    with running_postgres() as url:
        env = {"LETHE_DATABASE_URL": url, "LETHE_EMBEDDED_WORKER": "false",
               "LETHE_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
        first, second = start_servers(tiny_model_dir, [(tmp_path / "a.log", env), (tmp_path / "b.log", env)])
        try:
            delays = [measure_propagation(first, second, f"pg-propagation-{i}") for i in range(3)]
            delays.append(measure_propagation(second, first, "pg-propagation-back"))
            assert max(delays) < CONVERGENCE_BUDGET_S, delays
            hammer_then_kill(second, first, "pg-kill")
        finally:
            stop_server(second)
            stop_server(first)
