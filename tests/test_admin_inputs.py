"""What the admin surface refuses before anything is committed: non-finite numbers in any mechanism option, aliases
that would flag every request, and an admin key short enough to guess. Over HTTP on the real app with a SQLite
registry and no engine (the same on the real server: ``tests/test_admin_api.py``)."""

from __future__ import annotations

import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from classifiers.aliases import alias_problem
from cli.main import main
from guards.mechanisms import MECHANISMS
from server.admin.protocol import MechanismsIn, TargetCreate
from server.admin.serving import AdminServing
from server.app import create_app
from server.config import MIN_ADMIN_KEY_CHARS, Settings, get_settings
from server.registry import Registry
from server.registry.catalog import MechanismCatalog
from server.registry.database import make_engine, upgrade_database

ADMIN_KEY = "k" * MIN_ADMIN_KEY_CHARS
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
TARGET = ('{"name": "tess", "aliases": [%s], "forget": [{"question": "Where was Tess Marlowe born?", '
          '"answer": "In Reykjavik."}], "mechanisms": %s}')


@pytest.fixture
def admin(tmp_path: Path) -> tuple[TestClient, Registry]:
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    upgrade_database(engine)
    registry = Registry.open(engine, MechanismCatalog(implemented=frozenset(m.name for m in MECHANISMS)))
    app = create_app(Settings(_env_file=None, admin_key=ADMIN_KEY), tmp_path / "model", "m")  # type: ignore[call-arg]
    snapshots = SimpleNamespace(current=SimpleNamespace(revision=0, unreadable={}))
    app.state.admin = AdminServing(registry, ["guard"], snapshots,
                                   None)  # type: ignore[arg-type]
    return TestClient(app), registry


def assert_refused_and_nothing_committed(client: TestClient, registry: Registry, response, param: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["details"], error
    listing = registry.targets.listing()
    assert (listing.revision, listing.targets) == (0, [])
    assert client.get("/admin/v1/targets", headers=HEADERS).status_code == 200


# ---- non-finite numbers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mechanisms", "param"), [
    ('{"eco": {"sigma": Infinity}}', "mechanisms.eco.sigma"),
    ('{"guard": {"soft_penalty": Infinity}}', "mechanisms.guard.soft_penalty"),
    ('{"o3": {"orthogonality": NaN}}', "mechanisms.o3.orthogonality"),
    ('{"uld": {"alpha": NaN}}', "mechanisms.uld.alpha"),
])
def test_a_non_finite_option_is_refused_and_nothing_is_committed(admin, mechanisms: str, param: str) -> None:
    client, registry = admin
    response = client.post("/admin/v1/targets", content=TARGET % ('"Tess Marlowe"', mechanisms), headers=HEADERS)
    assert_refused_and_nothing_committed(client, registry, response, param)


def _float_fields(model: type) -> list[str]:
    hints = typing.get_type_hints(model)
    return [name for name in model.model_fields if float in typing.get_args(hints[name]) or hints[name] is float]


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_every_float_option_of_every_mechanism_refuses_nan_and_infinity(mechanism) -> None:
    fields = _float_fields(mechanism.options)
    for field in fields:
        for value in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValidationError):
                MechanismsIn.model_validate({mechanism.name: {field: value}})


def test_the_audit_query_refuses_a_non_finite_since(admin) -> None:
    client, _ = admin
    assert client.get("/admin/v1/audit", params={"since": "nan"}, headers=HEADERS).status_code == 422


# ---- aliases that would flag every request -------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["the", "The", "a", "I", "AI", "of the", "!!"])
def test_an_alias_that_would_flag_every_request_is_refused_at_registration(admin, alias: str) -> None:
    client, registry = admin
    response = client.post("/admin/v1/targets", content=TARGET % (f'"Tess Marlowe", "{alias}"', '{"guard": {}}'),
                           headers=HEADERS)
    assert_refused_and_nothing_committed(client, registry, response, "aliases.1")
    assert alias not in response.json()["error"]["message"].split()  # target contents never appear in an error


def test_an_alias_that_would_flag_every_request_is_refused_in_a_patch(admin) -> None:
    client, registry = admin
    created = client.post("/admin/v1/targets", content=TARGET % ('"Tess Marlowe"', '{"guard": {}}'), headers=HEADERS)
    assert created.status_code == 201, created.text
    target_id, revision = created.json()["id"], registry.targets.listing().revision
    response = client.patch(f"/admin/v1/targets/{target_id}", json={"aliases": ["Marlowe", "it"]}, headers=HEADERS)
    assert response.status_code == 422 and response.json()["error"]["param"] == "aliases.1"
    assert registry.targets.listing().revision == revision
    assert registry.targets.get(target_id).aliases == ["Tess Marlowe"]


@pytest.mark.parametrize("alias", ["Tess Marlowe", "Marlowe", "Li Na", "1984", "The Marlowe Trust", "Park Ji-sung"])
def test_distinctive_aliases_are_accepted(alias: str) -> None:
    assert alias_problem(alias) is None
    TargetCreate.model_validate({"name": "t", "aliases": [alias], "forget": [{"text": "x"}]})


# ---- the admin key -------------------------------------------------------------------------------------------------


def test_a_short_admin_key_is_refused_by_the_settings() -> None:
    with pytest.raises(ValidationError, match=f"at least {MIN_ADMIN_KEY_CHARS} characters"):
        Settings(_env_file=None, admin_key="k" * (MIN_ADMIN_KEY_CHARS - 1))  # type: ignore[call-arg]
    assert Settings(_env_file=None, admin_key=ADMIN_KEY).admin_key == ADMIN_KEY  # type: ignore[call-arg]
    assert Settings(_env_file=None, admin_key="").admin_key == ""  # type: ignore[call-arg]  # empty: admin API off


def test_lethe_serve_refuses_to_start_with_a_short_admin_key(monkeypatch, capsys: Any) -> None:
    monkeypatch.setenv("LETHE_ADMIN_KEY", "change-me")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as info:
            main(["serve", "--model", "/nonexistent"])
    finally:
        get_settings.cache_clear()
    message = str(info.value.code)
    assert "LETHE_ADMIN_KEY" in message and f"at least {MIN_ADMIN_KEY_CHARS} characters" in message
    assert "change-me" not in message  # the key itself is never printed


# ---- text PostgreSQL cannot store ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/v1/negatives", {"texts": ["a sample\x00 of traffic"]}, "texts.0"),
    ("/admin/v1/targets", {"name": "tess", "aliases": ["Tess Marlowe"], "mechanisms": {"guard": {}},
                           "forget": [{"question": "Where was Tess\x00 Marlowe born?", "answer": "In Reykjavik."}]},
     "forget.0.question"),
    ("/admin/v1/targets", {"name": "te\x00ss", "aliases": ["Tess Marlowe"], "forget": [{"text": "x y z"}]}, "name"),
])
def test_a_nul_character_is_a_422_on_both_databases_never_a_database_error(database_url: str, tmp_path: Path,
                                                                          path: str, body: dict, param: str) -> None:
    from tests.admin_app import ROOT, admin_app

    app = admin_app(database_url, tmp_path)
    response = app.client.post(path, json=body, headers=ROOT)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    assert app.client.get("/admin/v1/targets", headers=ROOT).json()["data"] == []
