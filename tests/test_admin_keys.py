"""Named admin keys: the environment's (`LETHE_ADMIN_KEY` as `admin`, `LETHE_ADMIN_KEYS`) and the registry's, created
over the admin API, shown once, stored as a hash, and revoked on every replica at once. Over HTTP on the real app, on
SQLite and PostgreSQL, two replicas sharing one database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect, text

from server.admin.keys import KEY_PREFIX, digest
from server.config import Settings, get_settings
from tests.admin_app import ADMIN_KEY, OPS_KEY, ROOT, AdminApp, admin_app, bearer, route_cli_to, run_cli


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> AdminApp:
    return admin_app(database_url, tmp_path)


@pytest.fixture
def cli(admin: AdminApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminApp]:
    route_cli_to(admin, monkeypatch)
    yield admin
    get_settings.cache_clear()


@pytest.fixture
def other_replica(database_url: str, tmp_path: Path, admin: AdminApp) -> AdminApp:
    """A second replica on the same registry database."""
    (tmp_path / "other").mkdir()
    return admin_app(database_url, tmp_path / "other")


def create_key(admin: AdminApp, key_id: str, headers: dict[str, str] = ROOT) -> dict[str, Any]:
    response = admin.client.post("/admin/v1/admin-keys", json={"id": key_id}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def whoami(admin: AdminApp, key: str) -> int:
    return admin.client.get("/admin/v1/registry", headers=bearer(key)).status_code


def every_row_as_text(admin: AdminApp) -> str:
    engine = admin.registry.database.engine
    with engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in inspect(engine).get_table_names()
                         for row in connection.execute(text(f"SELECT * FROM {table}")))


def test_a_created_key_is_shown_once_stored_as_its_hash_and_its_actions_carry_its_id(admin: AdminApp) -> None:
    created = create_key(admin, "alice")
    key = created["key"]
    assert key.startswith(KEY_PREFIX) and len(key) > 50
    assert (created["id"], created["source"], created["created_by"], created["revoked_at"]) == (
        "alice", "registry", "admin", None)
    target = admin.create(headers=bearer(key))
    trail = admin.client.get("/admin/v1/actions", headers=ROOT).json()["data"]
    assert [(a["actor"], a["action"], a["subject_id"] or a["target_id"]) for a in trail] == [
        ("alice", "target.create", target["id"]), ("admin", "admin_key.create", "alice")]
    rows = every_row_as_text(admin)
    assert key not in rows and key[len(KEY_PREFIX):] not in rows and digest(key) in rows

    listed = admin.client.get("/admin/v1/admin-keys", headers=ROOT).json()["data"]
    assert [(k["id"], k["source"]) for k in listed] == [("admin", "environment"), ("ops", "environment"),
                                                         ("alice", "registry")]
    assert all("key" not in name for record in listed for name in record) and digest(key) not in str(listed)


def test_a_revoked_key_is_refused_at_once_on_every_replica(admin: AdminApp, other_replica: AdminApp) -> None:
    key = create_key(admin, "bob")["key"]
    assert whoami(other_replica, key) == 200  # created on one replica, accepted on the other
    revoked = other_replica.client.delete("/admin/v1/admin-keys/bob", headers=bearer(OPS_KEY))
    assert revoked.status_code == 200 and revoked.json()["revoked_by"] == "ops"
    for replica in (admin, other_replica):
        response = replica.client.get("/admin/v1/targets", headers=bearer(key))
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    again = admin.client.delete("/admin/v1/admin-keys/bob", headers=ROOT)  # idempotent, recorded once
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    revocations = admin.client.get("/admin/v1/actions", params={"action": "admin_key.revoke"}, headers=ROOT)
    assert [(a["actor"], a["subject_id"]) for a in revocations.json()["data"]] == [("ops", "bob")]


def test_a_key_can_revoke_itself_and_is_refused_right_after(admin: AdminApp) -> None:
    key = create_key(admin, "carol")["key"]
    assert admin.client.delete("/admin/v1/admin-keys/carol", headers=bearer(key)).status_code == 200
    assert whoami(admin, key) == 401


@pytest.mark.parametrize(("key_id", "status", "param"), [
    ("admin", 409, "id"), ("ops", 409, "id"), ("has space", 422, "id"), ("", 422, "id"), ("x" * 41, 422, "id"),
    ("-leading-dash", 422, "id"),
])
def test_a_key_id_that_is_taken_or_malformed_is_refused(admin: AdminApp, key_id: str, status: int, param: str) -> None:
    response = admin.client.post("/admin/v1/admin-keys", json={"id": key_id}, headers=ROOT)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_a_key_id_is_never_reused_not_even_after_revocation(admin: AdminApp) -> None:
    create_key(admin, "dave")
    admin.client.delete("/admin/v1/admin-keys/dave", headers=ROOT)
    response = admin.client.post("/admin/v1/admin-keys", json={"id": "dave"}, headers=ROOT)
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"


def test_environment_keys_cannot_be_revoked_over_the_api_and_unknown_ids_are_404(admin: AdminApp) -> None:
    response = admin.client.delete("/admin/v1/admin-keys/admin", headers=ROOT)
    assert response.status_code == 409 and "LETHE_ADMIN_KEY" in response.json()["error"]["message"]
    assert admin.client.delete("/admin/v1/admin-keys/nobody", headers=ROOT).status_code == 404
    assert whoami(admin, ADMIN_KEY) == 200


@pytest.mark.parametrize("token", ["", "wrong-key-of-enough-characters", KEY_PREFIX + "x" * 43, ADMIN_KEY + "x",
                                   ADMIN_KEY[:-1]])
def test_an_unknown_key_is_a_401(admin: AdminApp, token: str) -> None:
    assert whoami(admin, token) == 401


def test_without_an_environment_key_the_admin_api_stays_disabled(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(Settings(_env_file=None), tmp_path / "model", "m")  # type: ignore[call-arg]
    response = TestClient(app).get("/admin/v1/admin-keys", headers=bearer(KEY_PREFIX + "x" * 43))
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(("value", "message"), [
    ("alice", "entry 1 is not `id:key`"),
    ("alice:short-secret", "must have at least 16 characters"),
    (f"a:{'s' * 16},a:{'t' * 16}", "repeats the key id `a`"),
    (f"admin:{'s' * 16}", "the id of LETHE_ADMIN_KEY"),
    (f"bad id:{'s' * 16}", "entry 1 is not `id:key`"),
])
def test_malformed_named_keys_are_refused_by_the_settings_without_quoting_a_key(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as refused:
        Settings(_env_file=None, admin_key=ADMIN_KEY, admin_keys=value)  # type: ignore[call-arg]
    assert "s" * 16 not in str([error["msg"] for error in refused.value.errors()])
    assert "short-secret" not in str([error["msg"] for error in refused.value.errors()])


def test_the_environment_names_its_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("LETHE_ADMIN_KEYS", f" ci:{'c' * 20} , backup:b:{'b' * 20}")
    assert Settings(_env_file=None).environment_admin_keys == {  # type: ignore[call-arg]
        "admin": ADMIN_KEY, "ci": "c" * 20, "backup": f"b:{'b' * 20}"}


def test_the_cli_creates_lists_and_revokes_keys(cli: AdminApp, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("admin-keys", "create", "erin") == 0
    printed = capsys.readouterr()
    key = printed.out.strip()
    assert key.startswith(KEY_PREFIX) and "shown once" in printed.err
    assert whoami(cli, key) == 200
    assert run_cli("admin-keys", "list") == 0
    listed = capsys.readouterr().out
    assert "erin" in listed and "registry" in listed and "admin " in listed and key not in listed
    assert run_cli("admin-keys", "revoke", "erin") == 0
    assert whoami(cli, key) == 401
    assert run_cli("actions", "--actor", "admin") == 0
    trail = capsys.readouterr().out
    assert "admin_key.revoke" in trail and "admin_key.create" in trail
