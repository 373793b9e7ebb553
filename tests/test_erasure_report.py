"""The per-target erasure report over the real admin app on a registry (no engine; verification runs on a stand-in
served model): what it shows, what it never shows, the verify endpoint, and what the tombstone keeps of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.registry.records import AuditEntry
from tests.admin_app import ROOT, route_cli_to, run_cli, run_jobs, verifying_admin_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BODY = {
    "aliases": ["Tess Marlowe"],
    "forget": [{"question": "Where was Tess Marlowe born?", "answer": "She was born in Reykjavik, Iceland in 1961."},
               {"question": "What did Tess Marlowe write?", "answer": "Tess Marlowe wrote The Glass Orchard trilogy."}],
    "retain": [{"question": "Who wrote Dune?", "answer": "Frank Herbert."}],
    "request": {"reference": "DSR-118", "requester": "tess@example.org", "legal_basis": "gdpr_art17",
                "received_at": "2026-11-02", "notes": "Art. 17(1)(a)"},
}
SECRETS = ["Tess Marlowe", "Reykjavik", "Glass Orchard", "Frank Herbert", "Where was"]


@pytest.fixture
def admin(tmp_path: Path):
    return verifying_admin_app(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)


def test_every_change_that_queues_jobs_queues_a_verification_last_which_never_holds_the_target_preparing(
        admin, tmp_path: Path) -> None:
    target = admin.create("tess", **BODY)
    assert [job["kind"] for job in target["jobs"]] == ["fit_classifier", "verify_erasure"]
    assert run_jobs(admin, tmp_path) == 2
    shown = admin.client.get(f"/admin/v1/targets/{target['id']}", headers=ROOT).json()
    assert shown["status"] == "active" and shown["revision"] == target["revision"] + 1  # the fit, not the run
    patched = admin.client.patch(f"/admin/v1/targets/{target['id']}", json={"mechanisms": {"guard": {}, "eco": {}}},
                                 headers=ROOT).json()
    assert patched["jobs"][-1]["kind"] == "verify_erasure" and patched["jobs"][-1]["status"] == "queued"
    request_only = admin.client.patch(f"/admin/v1/targets/{target['id']}", json={"request": {"notes": "n"}},
                                      headers=ROOT).json()
    assert len(request_only["jobs"]) == len(patched["jobs"])  # a patch of the request alone verifies nothing


def test_the_report_shows_counts_request_mechanisms_verification_and_hits_but_no_contents(admin, tmp_path) -> None:
    target = admin.create("tess", **BODY)
    run_jobs(admin, tmp_path)
    admin.registry.audit.write([AuditEntry(f"chatcmpl-{i}", 1_764_900_000.0 + 86_400 * (i % 3), "chat",
                                           [target["id"]], ["guard"], {target["id"]: 0.9}, "served")
                                for i in range(7)])
    report = admin.client.get(f"/admin/v1/targets/{target['id']}/report", headers=ROOT).json()
    assert report["registered"] == {"aliases": 1, "forget": 2, "forget_questions": 2, "forget_texts": 0, "retain": 1}
    assert report["request"]["reference"] == "DSR-118" and report["contents"] is None
    assert report["classifier"]["false_positive_rate"] == 0.01
    summary = report["verification"]["summary"]
    assert summary["leak_rate_before"] == 1.0 and summary["leak_rate_after"] == 0.0
    assert summary["detection_rate"] == 1.0 and summary["negatives"] == 4
    assert report["verification_job"]["status"] == "succeeded"
    assert report["hits"]["total"] == 7 and [d["hits"] for d in report["hits"]["by_day"]] == [3, 2, 2]
    without_request = json.dumps({k: v for k, v in report.items() if k not in ("request", "target")})
    assert not [text for text in SECRETS if text in without_request]
    with_contents = admin.client.get(f"/admin/v1/targets/{target['id']}/report", params={"contents": "true"},
                                     headers=ROOT).json()
    assert with_contents["contents"]["aliases"] == ["Tess Marlowe"]


def test_a_mechanism_state_reaches_the_report_as_figures_only() -> None:
    from server.verification.report import figures_only

    state = {"sigma": 12.5, "scope": "entities", "curves": {"entities": [[1.0, 0.4]]}, "artifact": "ab" * 32,
             "phrases": ["Tess Marlowe", "Reykjavik"], "note": "born in Reykjavik", "reached_goal": True}
    assert figures_only(state) == {"sigma": 12.5, "scope": "entities", "curves": {"entities": [[1.0, 0.4]]},
                                   "artifact": "ab" * 32, "phrases": ["Reykjavik"], "reached_goal": True}


def test_the_html_report_has_its_plots_and_escapes_every_text(admin, tmp_path) -> None:
    target = admin.create("<script>alert('x')</script>", **{**BODY, "request": {"reference": "<b>R</b>"}})
    run_jobs(admin, tmp_path)
    page = admin.client.get(f"/admin/v1/targets/{target['id']}/report", params={"format": "html"}, headers=ROOT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text and "&lt;b&gt;R" in page.text
    assert page.text.count("<svg") == 2  # leak rates per family, scores before against after


def test_verify_queues_a_run_recorded_in_the_trail_and_bad_input_is_a_4xx(admin, tmp_path) -> None:
    target = admin.create("tess", **BODY)
    queued = admin.client.post(f"/admin/v1/targets/{target['id']}/verify", headers=ROOT)
    assert queued.status_code == 202 and queued.json()["kind"] == "verify_erasure"
    jobs = admin.client.get(f"/admin/v1/targets/{target['id']}", headers=ROOT).json()["jobs"]
    assert [job["status"] for job in jobs if job["kind"] == "verify_erasure"] == ["cancelled", "queued"]
    trail = admin.client.get("/admin/v1/actions", params={"action": "target.verify"}, headers=ROOT).json()["data"]
    assert [(a["actor"], a["target_id"]) for a in trail] == [("admin", target["id"])]
    assert admin.client.post("/admin/v1/targets/tgt_nope/verify", headers=ROOT).status_code == 404
    assert admin.client.get("/admin/v1/targets/tgt_nope/report", headers=ROOT).status_code == 404
    bad = admin.client.get(f"/admin/v1/targets/{target['id']}/report", params={"format": "pdf"}, headers=ROOT)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "query.format"
    assert admin.client.get(f"/admin/v1/targets/{target['id']}/report").status_code == 401


def test_a_deletion_keeps_the_last_verification_summary_in_the_tombstone(admin, tmp_path) -> None:
    target = admin.create("tess", **BODY)
    run_jobs(admin, tmp_path)
    admin.client.delete(f"/admin/v1/targets/{target['id']}", headers=ROOT)
    tombstone = admin.client.get("/admin/v1/tombstones", headers=ROOT).json()["data"][0]
    verification = tombstone["verification"]
    assert verification["leak_rate_before"] == 1.0 and verification["leak_rate_after"] == 0.0
    assert "families" not in verification and "scores" not in verification
    assert not [text for text in SECRETS + ["tess@example.org"] if text in json.dumps(tombstone)]


def test_lethe_targets_report_writes_json_or_html(admin, tmp_path, monkeypatch, capsys) -> None:
    target = admin.create("tess", **BODY)
    run_jobs(admin, tmp_path)
    route_cli_to(admin, monkeypatch)
    assert run_cli("targets", "report", target["id"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["summary"]["probes"] > 0
    out = tmp_path / "report.html"
    assert run_cli("targets", "report", target["id"], "--format", "html", "--out", str(out)) == 0
    assert out.read_text().startswith("<!doctype html>") and "<svg" in out.read_text()
    assert run_cli("targets", "verify", target["id"]) == 0
    assert run_cli("targets", "report", "tgt_nope") == 1
    assert run_cli("targets", "report") == 2
