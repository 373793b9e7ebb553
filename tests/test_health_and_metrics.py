"""`/metrics` and the health probes answer from what the replica already knows: a database outage never fails a scrape,
and job counts are refreshed in the background (the app without its engine, a real SQLite registry)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from server import control_plane as control_plane_module
from server.app import create_app
from server.config import Settings
from server.control_plane import ControlPlane
from server.metrics import Metrics
from server.registry.models import JobRow
from server.registry.snapshot import RegistryHealth
from tests.test_jobs import add_target


class Unreachable:
    """A registry whose database is down: every use raises."""

    def __getattr__(self, name: str):
        raise ConnectionError("the registry database is unreachable")


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(), Path("/nonexistent"), "model")


def test_metrics_never_query_the_database(app) -> None:
    app.state.registry = Unreachable()
    response = TestClient(app).get("/metrics")
    assert response.status_code == 200 and "lethe_engine_up" in response.text


def test_metrics_behind_a_key_when_one_is_set() -> None:
    """A client watching the hit counter on a quiet server could see its own prompt counted: operators can close it."""
    client = TestClient(create_app(Settings(metrics_key="scrape-key-0123456789"), Path("/nonexistent"), "model"))
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-key-0123456789"})
    assert scraped.status_code == 200 and "lethe_target_hits_total" in scraped.text


def test_metrics_carry_vllms_series_beside_lethes_as_valid_exposition(app) -> None:
    """vLLM's Prometheus logger writes its `vllm:` series into prometheus_client's global registry (as the engine's does
    in `lethe serve`): /metrics shows them once each, but not the one whose labels list the LoRA adapters running."""
    prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ["model_name", "engine"])
    lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                      ["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
    try:
        prompt_tokens.labels("model", "0").inc(7)
        lora_info.labels("1", "", "o3-0123456789abcdef").set(1)
        text = TestClient(app).get("/metrics").text
    finally:
        REGISTRY.unregister(prompt_tokens)
        REGISTRY.unregister(lora_info)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["vllm:prompt_tokens"].samples[0].value == 7 and "lethe_engine_up" in families
    assert "vllm:lora_requests_info" not in text and "o3-" not in text
    assert "process_cpu_seconds_total" not in text  # the global registry's other collectors stay out
    help_lines = [line for line in text.splitlines() if line.startswith(("# HELP", "# TYPE"))]
    assert len(help_lines) == len(set(help_lines))


def test_job_counts_are_refreshed_in_the_background_and_survive_an_outage(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_plane_module, "JOB_COUNTS_INTERVAL_S", 0.02)
    monkeypatch.setattr(control_plane_module, "MAX_BACKOFF_S", 0.05)
    metrics = Metrics()
    control = ControlPlane.open(Settings(data_dir=tmp_path), metrics)
    add_target(control.registry)  # queues its jobs

    def count(status: str) -> float | None:
        return metrics.registry.get_sample_value("lethe_jobs", {"status": status})

    async def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        task = asyncio.create_task(control.watch_job_counts())
        await until(lambda: (count("queued") or 0) > 0)
        queued = count("queued")
        assert count("running") == 0
        JobRow.__table__.drop(control.registry.database.engine)  # the database loses the table: an outage
        failures = lambda: metrics.registry.get_sample_value("lethe_background_failures_total",  # noqa: E731
                                                             {"task": "job_counts"}) or 0
        await until(lambda: failures() >= 2)
        assert not task.done() and count("queued") == queued  # the last counts stay
        JobRow.__table__.create(control.registry.database.engine)  # back, empty
        await until(lambda: count("queued") == 0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


class FakeEngine:
    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.unfinished_requests = 0


def probe(app, path: str, engine: FakeEngine | None, snapshot_revision: int | None) -> int:
    app.state.engine = engine
    app.state.snapshots = SimpleNamespace(health=lambda: RegistryHealth(snapshot_revision, 0.1, None)) \
        if snapshot_revision is not None else None
    return TestClient(app).get(path).status_code


@pytest.mark.parametrize("engine, revision, live, ready, health", [
    (FakeEngine(True), 4, 200, 200, 200),
    (FakeEngine(True), -1, 200, 503, 200),  # no snapshot loaded yet (or ever, the database being down): not ready
    (FakeEngine(True), None, 200, 503, 200),
    (FakeEngine(False), 4, 503, 503, 503),  # a dead engine never recovers: restart the process
])
def test_liveness_and_readiness(app, engine, revision, live, ready, health) -> None:
    assert probe(app, "/health/live", engine, revision) == live
    assert probe(app, "/health/ready", engine, revision) == ready
    assert probe(app, "/health", engine, revision) == health


def test_a_background_loop_that_ends_is_logged_as_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    control = ControlPlane.open(Settings(data_dir=tmp_path), Metrics())

    async def broken_run() -> None:
        raise RuntimeError("a bug in the audit writer")

    monkeypatch.setattr(control.audit, "run", broken_run)

    async def scenario() -> None:
        await control.start()
        await asyncio.sleep(0.05)
        await control.stop()

    with caplog.at_level(logging.ERROR, logger="server"):
        asyncio.run(scenario())
    ended = [record for record in caplog.records if record.getMessage() == "background.task_ended"]
    assert [(record.task, record.error) for record in ended] == [("audit-writer", "RuntimeError")]
