"""The web console (``/admin/ui``) over the real admin app on a registry, without an engine or a browser: sessions,
CSRF, expiry, logout, revocation, cookie flags, escaping, and that its actions are the admin API's (trail actors)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from server.registry.models import ConsoleSessionRow
from tests.admin_app import ADMIN_KEY, OPS_KEY, ROOT, run_jobs, verifying_admin_app

UI = "/admin/ui"


@pytest.fixture
def admin(tmp_path: Path):
    return verifying_admin_app(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def login(client: TestClient, key: str = ADMIN_KEY) -> str:
    """Log in; the session's CSRF token (from the page it lands on)."""
    form = client.get(f"{UI}/login")
    response = client.post(f"{UI}/login", data={"csrf": csrf_of(form.text), "key": key})
    assert response.status_code == 200 and response.url.path == f"{UI}/targets", response.text[-500:]
    return csrf_of(response.text)


def test_pages_need_a_session_and_login_sets_an_httponly_strict_cookie(admin) -> None:
    client = admin.client
    assert client.get(f"{UI}/targets", follow_redirects=False).headers["location"] == f"{UI}/login"
    form = client.get(f"{UI}/login")
    done = client.post(f"{UI}/login", data={"csrf": csrf_of(form.text), "key": ADMIN_KEY}, follow_redirects=False)
    cookie = done.headers.get_list("set-cookie")[0]
    assert cookie.startswith("lethe_console=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/admin/ui" in cookie and "Secure" not in cookie and ADMIN_KEY not in cookie
    assert client.get(f"{UI}/targets").status_code == 200


def test_the_cookie_is_secure_over_https_or_when_configured(admin) -> None:
    https = TestClient(admin.client.app, base_url="https://testserver")
    form = https.get(f"{UI}/login")
    assert "Secure" in form.headers["set-cookie"]
    admin.client.app.state.settings = admin.client.app.state.settings.model_copy(
        update={"console_secure_cookie": "always"})
    assert "Secure" in admin.client.get(f"{UI}/login").headers["set-cookie"]


def test_a_wrong_key_or_a_login_without_its_csrf_token_is_refused(admin) -> None:
    client = admin.client
    token = csrf_of(client.get(f"{UI}/login").text)
    wrong = client.post(f"{UI}/login", data={"csrf": token, "key": "not-a-key-of-any-kind"})
    assert wrong.status_code == 401 and "not a valid admin key" in wrong.text
    assert client.post(f"{UI}/login", data={"csrf": "forged", "key": ADMIN_KEY}).status_code == 403
    fresh = TestClient(client.app)  # no login cookie: a cross-site post
    assert fresh.post(f"{UI}/login", data={"csrf": token, "key": ADMIN_KEY}).status_code == 403


def test_every_post_needs_the_sessions_csrf_token(admin) -> None:
    login(admin.client)
    target = admin.create("tess")
    for path in (f"/targets/{target['id']}/verify", f"/targets/{target['id']}/delete", "/logout", "/targets"):
        refused = admin.client.post(f"{UI}{path}", data={"csrf": "forged"})
        assert refused.status_code == 403 and "did not come from this console" in refused.text, path
    assert admin.client.get(f"/admin/v1/targets/{target['id']}", headers=ROOT).status_code == 200


def test_register_patch_verify_and_delete_through_the_forms_are_the_apis_with_the_sessions_key_id(admin) -> None:
    csrf = login(admin.client, OPS_KEY)
    form = {"csrf": csrf, "name": "tess", "aliases": "Tess Marlowe", "mechanism_guard": "on",
            "forget": "Where was Tess Marlowe born? | In Reykjavik.\nTess Marlowe wrote The Glass Orchard.",
            "reference": "DSR-9", "legal_basis": "gdpr_art17", "received_at": "2026-11-02", "requester": "T. M."}
    made = admin.client.post(f"{UI}/targets", data=form)
    assert made.status_code == 200 and "Done: registered" in made.text
    target_id = made.url.path.rsplit("/", 1)[1]
    stored = admin.client.get(f"/admin/v1/targets/{target_id}", headers=ROOT).json()
    assert stored["forget"][1] == {"question": None, "answer": None, "text": "Tess Marlowe wrote The Glass Orchard."}
    assert stored["request"]["requester"] == "T. M." and list(stored["mechanisms"]) == ["guard"]
    patch = {"csrf": csrf, "description": "updated", "aliases": "Tess Marlowe", "mechanism_guard": "on",
             "mechanism_eco": "on", "reference": "DSR-9", "legal_basis": "gdpr_art17", "received_at": "2026-11-02",
             "requester": ""}
    assert "Done: saved" in admin.client.post(f"{UI}/targets/{target_id}", data=patch).text
    assert admin.client.post(f"{UI}/targets/{target_id}", data=patch).text.count("Nothing changed") == 1
    assert admin.client.post(f"{UI}/targets/{target_id}/verify", data={"csrf": csrf}).status_code == 200
    assert "Delete it" in admin.client.get(f"{UI}/targets/{target_id}/delete").text
    gone = admin.client.post(f"{UI}/targets/{target_id}/delete", data={"csrf": csrf})
    assert gone.status_code == 200 and target_id in gone.text and "DSR-9" in gone.text  # the tombstones page
    trail = admin.client.get("/admin/v1/actions", params={"target_id": target_id}, headers=ROOT).json()["data"]
    assert [(a["actor"], a["action"]) for a in trail] == [
        ("ops", "target.delete"), ("ops", "target.verify"), ("ops", "target.patch"), ("ops", "target.create")]
    assert trail[1 + 1]["fields"] == ["description", "mechanisms", "request.requester"]


def test_a_refused_form_shows_the_apis_messages_and_keeps_what_was_typed(admin) -> None:
    csrf = login(admin.client)
    admin.create("tess")
    duplicate = admin.client.post(f"{UI}/targets", data={"csrf": csrf, "name": "tess", "forget": "a | b\nc | d",
                                                         "mechanism_guard": "on"})
    assert duplicate.status_code == 409 and "already exists" in duplicate.text
    broken = admin.client.post(f"{UI}/targets", data={"csrf": csrf, "name": "x", "forget": "q |",
                                                      "received_at": "2999-01-01"})
    assert broken.status_code == 422 and "mechanisms" in broken.text and 'value="x"' in broken.text
    assert admin.client.post(f"{UI}/targets", data={"csrf": csrf, "name": "x", "forget": "[oops"}).status_code == 422
    assert admin.client.get(f"{UI}/targets/tgt_nope").status_code == 404
    assert admin.client.get(f"{UI}/actions", params={"since": "yesterday"}).status_code == 422
    assert admin.client.get(f"{UI}/tombstones", params={"cursor": "bm9wZQ"}).status_code == 422


def test_every_text_a_user_typed_is_escaped(admin, tmp_path) -> None:
    login(admin.client)
    evil = "<script>alert('x')</script>"
    target = admin.create(evil, aliases=["Evil Person"], description=evil, request={"reference": evil, "notes": evil})
    run_jobs(admin, tmp_path)
    for path in ("/targets", f"/targets/{target['id']}", f"/targets/{target['id']}/report",
                 f"/targets/{target['id']}/delete", "/actions"):
        page = admin.client.get(f"{UI}{path}").text
        assert "<script>" not in page, path
    assert "&lt;script&gt;" in admin.client.get(f"{UI}/targets/{target['id']}").text


def test_the_trail_page_filters_and_pages_with_the_cursor(admin) -> None:
    login(admin.client)
    for i in range(55):
        admin.create(f"t{i}")
    first = admin.client.get(f"{UI}/actions", params={"action": "target.create"})
    assert first.text.count("target.create</td>") == 50
    next_link = re.search(r'href="(/admin/ui/actions\?[^"]+)" id="next-page"', first.text).group(1)
    second = admin.client.get(next_link.replace("&amp;", "&"))
    assert second.text.count("target.create</td>") == 5 and 'id="next-page"' not in second.text


def test_logout_and_expiry_end_the_session_and_so_does_revoking_its_key(admin) -> None:
    csrf = login(admin.client)
    out = admin.client.post(f"{UI}/logout", data={"csrf": csrf})
    assert out.url.path == f"{UI}/login" and "logged out" in out.text
    assert admin.client.get(f"{UI}/targets", follow_redirects=False).headers["location"] == f"{UI}/login"

    login(admin.client)
    with admin.registry.database.transaction() as session:
        session.execute(update(ConsoleSessionRow).values(expires_at=ConsoleSessionRow.created_at - timedelta(1)))
    expired = admin.client.get(f"{UI}/targets", follow_redirects=False)
    assert expired.headers["location"] == f"{UI}/login?message=expired"

    key = admin.client.post("/admin/v1/admin-keys", json={"id": "alice"}, headers=ROOT).json()["key"]
    alice = TestClient(admin.client.app)
    login(alice, key)
    admin.client.delete("/admin/v1/admin-keys/alice", headers=ROOT)
    assert alice.get(f"{UI}/targets", follow_redirects=False).status_code == 303


def test_the_console_is_off_while_the_admin_api_is(admin) -> None:
    admin.client.app.state.settings = admin.client.app.state.settings.model_copy(
        update={"admin_key": None, "admin_keys": {}})
    page = admin.client.get(f"{UI}/login")
    assert page.status_code == 403 and "disabled" in page.text
