"""What a deletion keeps: a tombstone with the request's reference, legal basis and dates, the registration and
deletion times and the mechanisms, a place for the verification's figures, and nothing that identifies whom or what
the target was about; listed at `GET /admin/v1/tombstones` with filters and a cursor, and by `lethe tombstones`.
Over HTTP on the real app, on SQLite and PostgreSQL. (No byte of the rest survives the erasure pass:
``tests/test_erasure.py``.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from server.config import get_settings
from server.errors import NotFound
from tests.admin_app import ROOT, AdminApp, admin_app, route_cli_to, run_cli

REQUEST = {"reference": "DSR-2026-118", "requester": "Jane Requester-Doe", "legal_basis": "gdpr_art17",
           "received_at": "2026-11-02T09:30:00Z", "effective_at": "2026-11-30", "notes": "Called twice; urgent."}
IDENTIFYING = ("tess", "Tess Marlowe", "Reykjavik", "Requester-Doe", "urgent", "a description")


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> AdminApp:
    return admin_app(database_url, tmp_path)


def tombstones(admin: AdminApp, **params: object) -> dict:
    response = admin.client.get("/admin/v1/tombstones", params=params, headers=ROOT)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_deleted_target_leaves_a_tombstone_with_the_requests_non_identifying_fields_only(admin: AdminApp) -> None:
    target = admin.create(request=REQUEST, description="a description", mechanisms={"guard": {}, "eco": {}})
    deleted = admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT).json()
    [tombstone] = tombstones(admin)["data"]
    assert tombstone == {
        "target_id": target["id"], "revision": deleted["revision"], "deleted_at": tombstone["deleted_at"],
        "purged_at": None, "registered_at": target["created_at"], "reference": "DSR-2026-118",
        "legal_basis": "gdpr_art17", "received_at": "2026-11-02T09:30:00", "effective_at": "2026-11-30T00:00:00",
        "mechanisms": ["eco", "guard"], "verification": None}
    assert tombstone["deleted_at"] >= target["created_at"]
    with admin.registry.database.engine.connect() as connection:
        stored = repr(connection.execute(text("SELECT * FROM tombstones")).all())
    assert not [word for word in IDENTIFYING if word in stored], stored
    assert admin.client.get(f"/admin/v1/targets/{target['id']}", headers=ROOT).status_code == 404


def test_a_target_without_a_request_leaves_a_bare_tombstone(admin: AdminApp) -> None:
    target = admin.create()
    admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
    [tombstone] = tombstones(admin)["data"]
    assert (tombstone["reference"], tombstone["legal_basis"], tombstone["mechanisms"]) == (None, None, ["guard"])


def test_the_verification_figures_are_kept_on_the_tombstone(admin: AdminApp) -> None:
    target = admin.create()
    admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
    admin.registry.tombstones.record_verification(target["id"], {"leak_rate_before": 0.8, "leak_rate_after": 0.05,
                                                                 "detection_rate": 0.97})
    assert tombstones(admin)["data"][0]["verification"] == {"leak_rate_before": 0.8, "leak_rate_after": 0.05,
                                                            "detection_rate": 0.97}
    with pytest.raises(NotFound):
        admin.registry.tombstones.record_verification("tgt_never", {"detection_rate": 1.0})


def test_tombstones_are_filtered_and_paged_newest_deletion_first(admin: AdminApp) -> None:
    ids = []
    for index, basis in enumerate(["gdpr_art17", "copyright", "gdpr_art17", "hazard", "gdpr_art17"]):
        target = admin.create(f"t{index}", request={"reference": f"REF-{index % 2}", "legal_basis": basis})
        admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
        ids.append(target["id"])
    assert [t["target_id"] for t in tombstones(admin)["data"]] == ids[::-1]

    seen, page = [], tombstones(admin, limit=2)
    while True:
        seen += [t["target_id"] for t in page["data"]]
        if page["next_cursor"] is None:
            break
        page = tombstones(admin, limit=2, cursor=page["next_cursor"])
    assert seen == ids[::-1]

    assert [t["target_id"] for t in tombstones(admin, legal_basis="gdpr_art17")["data"]] == [ids[4], ids[2], ids[0]]
    assert [t["target_id"] for t in tombstones(admin, reference="REF-1")["data"]] == [ids[3], ids[1]]
    assert [t["target_id"] for t in tombstones(admin, target_id=ids[2])["data"]] == [ids[2]]
    assert tombstones(admin, until="2000-01-01")["data"] == []
    assert len(tombstones(admin, since="2000-01-01")["data"]) == 5
    for params in ({"legal_basis": "whim"}, {"limit": 0}, {"cursor": "WyJhY3Rpb25zIiwxXQ"}):
        response = admin.client.get("/admin/v1/tombstones", params=params, headers=ROOT)
        assert response.status_code == 422, response.text


@pytest.fixture
def cli(admin: AdminApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminApp]:
    route_cli_to(admin, monkeypatch)
    yield admin
    get_settings.cache_clear()


def test_the_cli_lists_tombstones(cli: AdminApp, capsys: pytest.CaptureFixture) -> None:
    target = cli.create(request=REQUEST)
    cli.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
    assert run_cli("tombstones", "--legal-basis", "gdpr_art17") == 0
    listed = capsys.readouterr().out
    assert target["id"] in listed and "reference=DSR-2026-118" in listed and "purged=pending" in listed
    assert run_cli("tombstones", "--reference", "DSR-0", "--json") == 0
    assert capsys.readouterr().out == ""
