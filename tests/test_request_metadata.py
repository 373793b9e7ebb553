"""The request a target answers (reference, requester, legal basis, received and effective dates, notes): validated
with clear 422s and nothing committed, returned by GET and the listing, patched field by field, filterable, shown by
the CLI, and the requester never logged. Over HTTP on the real app, on SQLite and PostgreSQL, without an engine."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import get_settings
from tests.admin_app import ROOT, AdminApp, admin_app, route_cli_to, run_cli

REQUEST = {"reference": "TICKET-4711", "requester": "Jane Requester-Doe", "legal_basis": "gdpr_art17",
           "received_at": "2026-11-02", "effective_at": "2026-11-30T12:00:00+01:00", "notes": "Art. 17(1)(a)."}


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> AdminApp:
    return admin_app(database_url, tmp_path)


def test_a_targets_request_is_stored_and_returned_by_get_and_the_listing(admin: AdminApp) -> None:
    created = admin.create(request=REQUEST)
    expected = {**REQUEST, "received_at": "2026-11-02T00:00:00", "effective_at": "2026-11-30T11:00:00"}  # UTC
    assert created["request"] == expected
    assert admin.client.get(f"/admin/v1/targets/{created['id']}", headers=ROOT).json()["request"] == expected
    [listed] = admin.client.get("/admin/v1/targets", headers=ROOT).json()["data"]
    assert listed["request"] == expected
    assert admin.registry.targets.request(created["id"]).reference == "TICKET-4711"


def test_a_target_without_a_request_has_an_empty_one(admin: AdminApp) -> None:
    assert admin.create()["request"] == dict.fromkeys(REQUEST)


@pytest.mark.parametrize(("request_fields", "param"), [
    ({"received_at": "2026-11-02", "effective_at": "2026-11-01"}, "request"),
    ({"received_at": "1850-01-01"}, "request.received_at"),
    ({"effective_at": "2400-01-01"}, "request.effective_at"),
    ({"received_at": "2099-01-01"}, "request.received_at"),  # received in the future
    ({"received_at": "2026-02-30"}, "request.received_at"),
    ({"legal_basis": "because"}, "request.legal_basis"),
    ({"reference": ""}, "request.reference"),
    ({"reference": "T-1\nT-2"}, "request.reference"),
    ({"requester": "x" * 201}, "request.requester"),
    ({"notes": "n" * 2001}, "request.notes"),
    ({"notes": "nul\u0000"}, "request.notes"),
    ({"ticket": "T-1"}, "request.ticket"),
])
def test_an_invalid_request_is_refused_with_its_field_and_nothing_is_committed(
        admin: AdminApp, request_fields: dict, param: str) -> None:
    body = {"name": "tess", "aliases": ["Tess Marlowe"], "forget": [{"text": "Tess Marlowe lives in Reykjavik."}],
            "mechanisms": {"guard": {}}, "request": request_fields}
    response = admin.client.post("/admin/v1/targets", json=body, headers=ROOT)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["details"], error
    assert admin.registry.targets.listing().targets == [] and admin.registry.targets.revision() == 0
    assert admin.client.get("/admin/v1/actions", headers=ROOT).json()["data"] == []


def test_a_patch_changes_only_the_request_fields_it_gives_and_null_clears_one(admin: AdminApp) -> None:
    target = admin.create(request=REQUEST)
    response = admin.client.patch(f"/admin/v1/targets/{target['id']}", headers=ROOT,
                                  json={"request": {"requester": None, "notes": "Handled."}})
    assert response.status_code == 200, response.text
    assert response.json()["request"] == {**target["request"], "requester": None, "notes": "Handled."}
    assert response.json()["revision"] == target["revision"] + 1
    assert [job["kind"] for job in response.json()["jobs"]] == [job["kind"] for job in target["jobs"]]  # no refit


def test_a_patch_whose_effective_date_falls_before_the_stored_received_date_is_refused(admin: AdminApp) -> None:
    target = admin.create(request=REQUEST)
    revision = admin.registry.targets.revision()
    response = admin.client.patch(f"/admin/v1/targets/{target['id']}", headers=ROOT,
                                  json={"request": {"effective_at": "2026-10-01"}, "description": "changed"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "request.effective_at"
    unchanged = admin.client.get(f"/admin/v1/targets/{target['id']}", headers=ROOT).json()
    assert unchanged["request"] == target["request"] and unchanged["description"] == ""
    assert admin.registry.targets.revision() == revision


def test_the_listing_filters_by_reference_legal_basis_and_received_date(admin: AdminApp) -> None:
    gdpr = admin.create("ana", request={"reference": "T-1", "legal_basis": "gdpr_art17", "received_at": "2026-03-01"})
    book = admin.create("ben", request={"reference": "T-2", "legal_basis": "copyright",
                                        "received_at": "2026-06-15T10:00:00Z"})
    bare = admin.create("cal")

    def ids(**filters: str) -> list[str]:
        response = admin.client.get("/admin/v1/targets", params=filters, headers=ROOT)
        assert response.status_code == 200, response.text
        return [target["id"] for target in response.json()["data"]]

    assert ids() == [gdpr["id"], book["id"], bare["id"]]
    assert ids(reference="T-2") == [book["id"]]
    assert ids(legal_basis="gdpr_art17") == [gdpr["id"]]
    assert ids(received_after="2026-04-01") == [book["id"]]
    assert ids(received_before="2026-06-15T10:00:00Z") == [gdpr["id"], book["id"]]  # bounds are inclusive
    assert ids(received_after="2026-01-01", received_before="2026-05-01T00:00:00+02:00") == [gdpr["id"]]
    assert ids(reference="T-9") == []
    response = admin.client.get("/admin/v1/targets", params={"legal_basis": "nope"}, headers=ROOT)
    assert response.status_code == 422 and response.json()["error"]["param"] == "query.legal_basis"
    for params in ({"received_after": "yesterday"}, {"reference": "T\u0000"}, {"reference": "T" * 201}):
        response = admin.client.get("/admin/v1/targets", params=params, headers=ROOT)
        assert response.status_code == 422, response.text  # never a database error (PostgreSQL refuses U+0000)


def test_the_requester_is_never_logged(admin: AdminApp, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # An earlier test may have run configure_logging (no propagation) or Alembic's fileConfig (existing loggers
    # disabled): this test reads every record of Lethe's own loggers whatever ran before it.
    for name in ("server", "guards", "classifiers"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] in ("server", "guards", "classifiers") and isinstance(logger, logging.Logger):
            monkeypatch.setattr(logger, "disabled", False)
            monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.DEBUG)
    target = admin.create(request=REQUEST)
    admin.client.patch(f"/admin/v1/targets/{target['id']}", json={"request": {"requester": "John Other-Person"}},
                       headers=ROOT)
    admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert "target.deleted" in logged
    assert "Requester-Doe" not in logged and "Other-Person" not in logged


# ---- the CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(admin: AdminApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminApp]:
    route_cli_to(admin, monkeypatch)
    yield admin
    get_settings.cache_clear()


def test_the_cli_registers_a_target_with_its_request_and_lists_and_shows_it(
        cli: AdminApp, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    body = {"name": "tess", "aliases": ["Tess Marlowe"], "forget": [{"text": "Tess Marlowe lives in Reykjavik."}],
            "mechanisms": {"guard": {}}, "request": {"notes": "from the file"}}
    (tmp_path / "target.json").write_text(json.dumps(body))
    assert run_cli("targets", "add", "--file", str(tmp_path / "target.json"), "--reference", "T-77",
                   "--requester", "Jane Requester-Doe", "--legal-basis", "copyright", "--received-at",
                   "2026-11-02") == 0
    target_id = capsys.readouterr().out.split()[1]
    request = cli.registry.targets.request(target_id)
    assert (request.reference, request.requester, request.legal_basis, request.notes) == (
        "T-77", "Jane Requester-Doe", "copyright", "from the file")

    assert run_cli("targets", "list", "--legal-basis", "copyright") == 0
    listed = capsys.readouterr().out
    assert target_id in listed and "reference=T-77" in listed and "legal_basis=copyright" in listed
    assert "Requester-Doe" not in listed  # the one-line listing leaves the requester out
    assert run_cli("targets", "list", "--reference", "T-78") == 0
    assert capsys.readouterr().out == ""
    assert run_cli("targets", "show", target_id) == 0
    assert json.loads(capsys.readouterr().out)["request"]["requester"] == "Jane Requester-Doe"


def test_the_cli_reports_an_invalid_request_field_and_exits_1(
        cli: AdminApp, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    body = {"name": "tess", "aliases": ["Tess Marlowe"], "forget": [{"text": "Tess Marlowe lives in Reykjavik."}]}
    (tmp_path / "target.json").write_text(json.dumps(body))
    assert run_cli("targets", "add", "--file", str(tmp_path / "target.json"), "--legal-basis", "whim") == 1
    assert "HTTP 422" in capsys.readouterr().err
    assert cli.registry.targets.listing().targets == []
