"""The real admin API app on a registry database, without an engine: what the compliance-record tests drive over HTTP
(``tests/test_request_metadata.py``, ``test_admin_trail.py``, ``test_admin_keys.py``, ``test_tombstones.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cli.main import main
from guards.mechanisms import MECHANISMS
from server.admin.serving import AdminServing
from server.admin_client import AdminClient
from server.app import create_app
from server.config import Settings, get_settings
from server.registry import Registry
from server.registry.catalog import MechanismCatalog
from server.registry.database import make_engine, upgrade_database

ADMIN_KEY = "root-key-of-24-characters"
OPS_KEY = "ops-key-of-24-characters!"
ENVIRONMENT_KEYS = f"ops:{OPS_KEY}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ROOT = bearer(ADMIN_KEY)


@dataclass
class AdminApp:
    client: TestClient
    registry: Registry

    def create(self, name: str = "tess", headers: dict[str, str] = ROOT, **fields: Any) -> dict[str, Any]:
        body = {"name": name, "aliases": [f"{name.title()} Marlowe"], "mechanisms": {"guard": {}},
                "forget": [{"question": f"Where was {name.title()} Marlowe born?", "answer": "In Reykjavik."}],
                **fields}
        response = self.client.post("/admin/v1/targets", json=body, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()


def admin_app(database_url: str, tmp_path: Path) -> AdminApp:
    engine = make_engine(database_url)
    upgrade_database(engine)
    registry = Registry.open(engine, MechanismCatalog(implemented=frozenset(m.name for m in MECHANISMS)))
    settings = Settings(_env_file=None, admin_key=ADMIN_KEY, admin_keys=ENVIRONMENT_KEYS)  # type: ignore[call-arg]
    app = create_app(settings, tmp_path / "model", "m")
    snapshots = SimpleNamespace(current=SimpleNamespace(revision=0, unreadable={}))
    app.state.admin = AdminServing(registry, ["guard"], snapshots, None)  # type: ignore[arg-type]
    return AdminApp(TestClient(app), registry)


def route_cli_to(admin: AdminApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `lethe …` admin commands talk to this app instead of a server at ``--url`` (undo: the monkeypatch and
    ``get_settings.cache_clear()``)."""
    monkeypatch.setenv("LETHE_ADMIN_KEY", ADMIN_KEY)

    def client_of(_: Any) -> AdminClient:
        client = AdminClient("http://testserver", ADMIN_KEY)
        client._admin = TestClient(admin.client.app, base_url="http://testserver/admin/v1", headers=ROOT)
        return client

    monkeypatch.setattr("cli.admin.admin_client", client_of)
    monkeypatch.setattr("cli.records.admin_client", client_of)
    get_settings.cache_clear()


def run_cli(*argv: str) -> int:
    """``lethe ARGV`` in this process; its exit status."""
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


CLASSIFIER_FITTED = {"status": "ready", "artifact": "0" * 64, "threshold": 0.5, "false_positive_rate": 0.01,
                     "heldout_recall": 1.0}


def verifying_admin_app(database_url: str, tmp_path: Path) -> AdminApp:
    """The admin app on a registry that queues a verification run behind every change (as ``lethe serve`` does)."""
    admin = admin_app(database_url, tmp_path)
    catalog = MechanismCatalog(implemented=frozenset(m.name for m in MECHANISMS), verify_after_changes=True)
    registry = Registry.open(admin.registry.database.engine, catalog)
    admin.client.app.state.admin = AdminServing(registry, ["guard"], admin.client.app.state.admin._snapshots, None)
    return AdminApp(admin.client, registry)


def run_jobs(admin: AdminApp, tmp_path: Path, wait_s: float = 0.0) -> int:
    """Run every queued job in this process: classifier fits as if fitted, verification runs on the stand-in served
    model (``tests/fake_probed_model.py``); the number of jobs run."""
    from server.artifacts import ArtifactStore
    from server.jobs import JobWorker
    from server.registry.catalog import FIT_CLASSIFIER, VERIFY_ERASURE
    from server.verification.job import VerificationJob, VerificationSettings
    from tests.fake_probed_model import FakeProbedModel

    def verify(context: Any) -> dict[str, Any]:
        target = context.target
        model = FakeProbedModel(target.id, target.forget, target.aliases)
        settings = VerificationSettings(max_probes=60, max_tokens=16, negatives=4, wait_s=wait_s)
        return VerificationJob(model, admin.registry.targets.get, settings, sleep=lambda _: None)(context)

    worker = JobWorker(admin.registry, ArtifactStore(tmp_path / "artifacts"),
                       {FIT_CLASSIFIER: lambda _: dict(CLASSIFIER_FITTED), VERIFY_ERASURE: verify})
    ran = 0
    while worker.run_once():
        ran += 1
    return ran
