"""Background work through the real server (`lethe serve`, real vLLM engine, tiny model): a replica whose artifacts
volume lost a target's files starts, serves that target degraded under interim protection and applies every other
change; a PostgreSQL outage stops neither serving nor `/metrics`, and the requests served meanwhile are audited once
the database is back. Each test starts a server of its own (on a copied registry, a database stopped under it)."""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx

from tests.conftest import RunningServer, admin_headers, auth_headers, remove_targets, start_server, stop_server
from tests.postgres import postgres_server
from tests.unlearning import FORGET01, target_body

JOB_TIMEOUT_S = 300


def admin_client(server: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=f"{server.base_url}/admin/v1", headers=admin_headers(), timeout=60)


def register_and_wait(admin: httpx.Client, body: dict) -> dict:
    created = admin.post("/targets", json=body)
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (target := admin.get(f"/targets/{created.json()['id']}").json())["status"] == "preparing":
        assert time.monotonic() < deadline, target["jobs"]
        time.sleep(1)
    return target


def wait_served(admin: httpx.Client, revision: int) -> None:
    deadline = time.monotonic() + 10
    while admin.get("/registry").json()["serving_revision"] < revision:
        assert time.monotonic() < deadline, f"revision {revision} not served"
        time.sleep(0.1)


def naming_question(author) -> str:
    return next(item.question for item in author.items if author.name in item.question)


def ask(server: RunningServer, question: str) -> httpx.Response:
    model = httpx.get(f"{server.base_url}/v1/models", headers=auth_headers()).json()["data"][0]["id"]
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=auth_headers(), timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0})


def copy_sqlite(source: Path, destination: Path) -> None:
    """A consistent copy of a live SQLite database (its backup API: the write-ahead log included)."""
    with closing(sqlite3.connect(source)) as live, closing(sqlite3.connect(destination)) as copy:
        live.backup(copy)


def audited(admin: httpx.Client, response_ids: list[str], timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = admin.get("/audit", params={"limit": 1000})
        records = {r["request_id"]: r for r in response.json()["data"]} if response.status_code == 200 else {}
        if set(response_ids) <= set(records):
            return records
        assert time.monotonic() < deadline, f"not audited: {set(response_ids) - set(records)}"
        time.sleep(0.5)


def test_a_replica_starts_and_serves_with_a_targets_artifacts_missing(
        lethe_server: RunningServer, admin: httpx.Client, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The replica's registry is the session server's, copied once a GUARD target was registered there; its artifacts
    directory is empty: the volume lost every file the target's registration wrote."""
    author, other = FORGET01[0], FORGET01[1]
    data = tmp_path / "data"
    data.mkdir()
    broken = register_and_wait(admin, target_body(author, {"guard": {}}))
    try:
        assert broken["status"] == "active"
        copy_sqlite(Path(lethe_server.env["LETHE_DATA_DIR"]) / "lethe.db", data / "lethe.db")
    finally:
        remove_targets(admin, [broken["id"]])
    env = {"LETHE_DATA_DIR": str(data)}
    server = start_server(tiny_model_dir, tmp_path / "second.log", env)  # used to crash-loop here
    try:
        assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
        with admin_client(server) as replica:
            shown = replica.get(f"/targets/{broken['id']}").json()
            assert shown["status"] == "degraded" and "cannot read" in shown["message"], shown
            assert shown["mechanisms"]["guard"]["status"] == "failed"
            reply = ask(server, naming_question(author))
            assert reply.status_code == 200, reply.text  # served, under interim protection
            record = audited(replica, [reply.json()["id"]], 10)[reply.json()["id"]]
            assert record["targets"] == [broken["id"]] and record["mechanisms"] == ["interim"]
            added = register_and_wait(replica, target_body(other, {"guard": {}}))
            assert added["status"] == "active"  # a new registration is enforced
            wait_served(replica, replica.get("/registry").json()["revision"])
            deleted = replica.delete(f"/targets/{broken['id']}")
            assert deleted.status_code == 200
            wait_served(replica, deleted.json()["revision"])  # and a delete applies
            metrics = httpx.get(f"{server.base_url}/metrics").text
            assert "lethe_targets_unreadable 0.0" in metrics
    finally:
        stop_server(server)


def test_a_postgres_outage_stops_neither_serving_nor_metrics_and_loses_no_audit_record(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with postgres_server() as database:
        env = {"LETHE_DATABASE_URL": database.url, "LETHE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
               "LETHE_AUDIT_PROMPTS": "true"}
        server = start_server(tiny_model_dir, tmp_path / "server.log", env)
        try:
            with admin_client(server) as admin:
                target = register_and_wait(admin, target_body(FORGET01[0], {"guard": {}}))
                wait_served(admin, admin.get("/registry").json()["revision"])
                database.stop()
                served = [ask(server, question) for question in
                          (naming_question(FORGET01[0]), "What is the capital of France?", "nul \u0000 inside")]
                assert [reply.status_code for reply in served] == [200, 200, 200]  # from the last snapshot
                assert httpx.get(f"{server.base_url}/metrics").status_code == 200
                assert httpx.get(f"{server.base_url}/health/live").status_code == 200
                assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
                time.sleep(3)  # several failed writes, reloads and job counts
                database.start()
                records = audited(admin, [reply.json()["id"] for reply in served], timeout_s=60)
                assert records[served[0].json()["id"]]["targets"] == [target["id"]]
                assert "\ufffd" in records[served[2].json()["id"]]["prompt"]  # NUL stored as U+FFFD
                metrics = httpx.get(f"{server.base_url}/metrics").text
                assert re.search(r'lethe_background_failures_total\{task="audit_write"\} [1-9]', metrics)
                assert not re.search(r"lethe_audit_dropped_total\{[^}]*\} [1-9]", metrics)
        finally:
            stop_server(server)
