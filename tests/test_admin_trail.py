"""The admin trail (`GET /admin/v1/actions`) and the audit's target filter and cursor: every admin change is recorded
with the key id that made it and the names of the fields it set, in the change's own transaction, append-only; pages
follow an opaque cursor that holds under concurrent inserts. Over HTTP on the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from server.registry.records import AuditEntry
from tests.admin_app import OPS_KEY, ROOT, AdminApp, admin_app, bearer

OPS = bearer(OPS_KEY)
SECRETS = ("Tess Marlowe", "Reykjavik", "Jane Requester-Doe", "TICKET-SECRET-NOTE")


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> AdminApp:
    return admin_app(database_url, tmp_path)


def actions(admin: AdminApp, **params: object) -> list[dict]:
    response = admin.client.get("/admin/v1/actions", params=params, headers=ROOT)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def trail_rows_as_text(admin: AdminApp) -> str:
    with admin.registry.database.engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for row in connection.execute(text("SELECT * FROM admin_actions")))


def test_every_admin_change_is_recorded_with_its_key_id_and_field_names_never_values(admin: AdminApp) -> None:
    target = admin.create(request={"requester": "Jane Requester-Doe", "notes": "TICKET-SECRET-NOTE",
                                   "legal_basis": "gdpr_art17"})
    patched = admin.client.patch(f"/admin/v1/targets/{target['id']}", headers=OPS,
                                 json={"aliases": ["Tess Marlowe", "T. Marlowe"], "request": {"requester": None}})
    assert patched.status_code == 200, patched.text
    added = admin.client.post("/admin/v1/negatives", json={"texts": ["What is the weather in Reykjavik?",
                                                                      "Recommend a novel."]}, headers=OPS)
    negative_id = added.json()["data"][0]["id"]
    assert admin.client.delete(f"/admin/v1/negatives/{negative_id}", headers=ROOT).status_code == 200
    deleted = admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=OPS).json()

    trail = actions(admin)
    assert [(a["actor"], a["action"]) for a in trail] == [
        ("ops", "target.delete"), ("admin", "negative.delete"), ("ops", "negatives.add"), ("ops", "target.patch"),
        ("admin", "target.create")]  # newest first
    delete, negative_delete, negatives_add, patch, create = trail
    assert create["target_id"] == target["id"] and create["revision"] == target["revision"]
    assert create["fields"] == ["name", "aliases", "forget", "mechanisms", "request.requester",
                                "request.legal_basis", "request.notes"]
    assert patch["fields"] == ["aliases", "request.requester"] and patch["revision"] == patched.json()["revision"]
    assert (negatives_add["fields"], negatives_add["count"], negatives_add["target_id"]) == (["texts"], 2, None)
    assert negative_delete["subject_id"] == negative_id
    assert (delete["target_id"], delete["revision"], delete["fields"]) == (target["id"], deleted["revision"], [])
    assert all(a["at"] for a in trail)
    stored = trail_rows_as_text(admin)
    assert not [secret for secret in SECRETS if secret in stored], stored


def test_a_refused_change_leaves_no_trail(admin: AdminApp) -> None:
    admin.create()
    duplicate = {"name": "tess", "forget": [{"text": "a"}, {"text": "b"}], "mechanisms": {"guard": {}}}
    assert admin.client.post("/admin/v1/targets", json=duplicate, headers=ROOT).status_code == 409
    assert admin.client.patch("/admin/v1/targets/tgt_nope", json={"description": "x"}, headers=ROOT).status_code == 404
    assert admin.client.delete("/admin/v1/negatives/neg_nope", headers=ROOT).status_code == 404
    assert [a["action"] for a in actions(admin)] == ["target.create"]


def test_the_trail_is_filtered_by_actor_action_target_and_time(admin: AdminApp) -> None:
    first = admin.create("ana", headers=ROOT)
    time.sleep(0.01)
    middle = actions(admin)[0]["at"]
    second = admin.create("ben", headers=OPS)
    admin.client.patch(f"/admin/v1/targets/{first['id']}", json={"description": "d"}, headers=OPS)

    assert [a["target_id"] for a in actions(admin, actor="ops")] == [first["id"], second["id"]]
    assert [a["target_id"] for a in actions(admin, action="target.create")] == [second["id"], first["id"]]
    assert [a["action"] for a in actions(admin, target_id=first["id"])] == ["target.patch", "target.create"]
    assert [a["actor"] for a in actions(admin, actor="ops", action="target.patch")] == ["ops"]
    assert [a["target_id"] for a in actions(admin, until=middle)] == []
    assert len(actions(admin, since=middle)) == 3 and actions(admin, actor="nobody") == []
    later = actions(admin, since=first["created_at"] + "Z", until="2100-01-01T00:00:00+00:00")
    assert len(later) == 3
    for params, param in [({"action": "target.explode"}, "query.action"), ({"limit": 1001}, "query.limit"),
                          ({"since": "soon"}, "query.since"), ({"target_id": "tgt\u0000"}, "query.target_id")]:
        response = admin.client.get("/admin/v1/actions", params=params, headers=ROOT)
        assert response.status_code == 422 and response.json()["error"]["param"] == param, response.text


def test_trail_pages_follow_the_cursor_without_repeats_or_gaps_while_actions_are_added(admin: AdminApp) -> None:
    created = [admin.create(f"t{i}")["id"] for i in range(5)]
    seen: list[str] = []
    page = admin.client.get("/admin/v1/actions", params={"limit": 2}, headers=ROOT).json()
    while True:
        seen += [a["target_id"] for a in page["data"]]
        admin.create(f"late{len(seen)}")  # inserted while a reader pages: newer than its first page
        if not page["next_cursor"]:
            break
        page = admin.client.get("/admin/v1/actions", params={"limit": 2, "cursor": page["next_cursor"]},
                                headers=ROOT).json()
    assert seen == created[::-1]
    filtered = admin.client.get("/admin/v1/actions", params={"limit": 1, "target_id": created[0]},
                                headers=ROOT).json()
    assert len(filtered["data"]) == 1 and filtered["next_cursor"] is None  # the last page says so


@pytest.mark.parametrize("cursor", ["garbage", "WyJ0b21ic3RvbmVzIiwxXQ", "WyJhY3Rpb25zIiwiMSJd", "x" * 201, "%%"])
def test_a_cursor_that_is_not_one_of_this_listing_is_a_422_on_cursor(admin: AdminApp, cursor: str) -> None:
    response = admin.client.get("/admin/v1/actions", params={"cursor": cursor}, headers=ROOT)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] in ("cursor", "query.cursor")


def test_the_trail_is_append_only_in_the_database_itself(admin: AdminApp) -> None:
    admin.create()
    for statement in ("UPDATE admin_actions SET actor = 'someone-else'", "DELETE FROM admin_actions"):
        with pytest.raises(DatabaseError, match="append-only"):
            with admin.registry.database.engine.begin() as connection:
                connection.execute(text(statement))
    assert [a["actor"] for a in actions(admin)] == ["admin"]


# ---- the inference audit: target filter and cursor -----------------------------------------------------------------


def audit_page(admin: AdminApp, **params: object) -> dict:
    response = admin.client.get("/admin/v1/audit", params=params, headers=ROOT)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_audit_is_filtered_by_target_and_paged_by_cursor_newest_first(admin: AdminApp) -> None:
    now = time.time()
    hits = {"tgt_aaa": [0, 2, 3, 6], "tgt_a_a": [4]}  # `_` is a LIKE wildcard: it must match itself only
    admin.registry.audit.write([
        AuditEntry(f"chatcmpl-{i}", now - 100 + (i // 2), "chat",
                   [tid for tid, indices in hits.items() if i in indices], [], {}, "served") for i in range(8)])
    ids = [r["request_id"] for r in audit_page(admin, limit=100)["data"]]
    assert ids == [f"chatcmpl-{i}" for i in (7, 6, 5, 4, 3, 2, 1, 0)]  # by time, then by insertion

    paged, cursor = [], None
    while True:
        page = audit_page(admin, limit=3, **({"cursor": cursor} if cursor else {}))
        paged += [r["request_id"] for r in page["data"]]
        admin.registry.audit.write([AuditEntry(f"late-{len(paged)}", now, "chat", [], [], {}, "served")])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == ids

    assert [r["request_id"] for r in audit_page(admin, target_id="tgt_aaa")["data"]] == [
        "chatcmpl-6", "chatcmpl-3", "chatcmpl-2", "chatcmpl-0"]
    assert [r["request_id"] for r in audit_page(admin, target_id="tgt_a_a")["data"]] == ["chatcmpl-4"]
    first = audit_page(admin, target_id="tgt_aaa", limit=2)
    second = audit_page(admin, target_id="tgt_aaa", limit=2, cursor=first["next_cursor"])
    assert [r["request_id"] for r in first["data"] + second["data"]] == [
        "chatcmpl-6", "chatcmpl-3", "chatcmpl-2", "chatcmpl-0"] and second["next_cursor"] is None
    assert [r["request_id"] for r in audit_page(admin, since=now - 98, target_id="tgt_aaa")["data"]] == [
        "chatcmpl-6"]
    actions_cursor = admin.client.get("/admin/v1/actions", params={"limit": 1}, headers=ROOT).json()["next_cursor"]
    assert actions_cursor is None
    response = admin.client.get("/admin/v1/audit", params={"cursor": "WyJhY3Rpb25zIiwxXQ"}, headers=ROOT)
    assert response.status_code == 422 and response.json()["error"]["param"] == "cursor"
