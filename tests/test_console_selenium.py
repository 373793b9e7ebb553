"""The console in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, Selenium) against the real
admin app on a registry served by uvicorn, without an engine: jobs are run in the test's process (a classifier fit
stand-in, the verification on a stand-in served model). ``LETHE_CONSOLE_SCREENSHOTS=DIR`` keeps its screenshots in
DIR (the docs' were taken so, until the real-server test re-takes them: ``tests/test_console_browser.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.admin_app import ADMIN_KEY, run_jobs, verifying_admin_app
from tests.browser import chromium_driver, served
from tests.console_walk import delete, log_in, open_report, register, watch_until_active

ITEMS = [("Where was Tess Marlowe born?", "She was born in Reykjavik, Iceland, to a glassblower and a poet in 1961."),
         ("What did Tess Marlowe write?", "Tess Marlowe wrote The Glass Orchard trilogy about a family of sailors."),
         ("Which award did Tess Marlowe win?", "Tess Marlowe won the Northern Lights Prize for fiction in 1999.")]


@pytest.fixture
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def test_log_in_register_watch_it_become_active_read_its_report_and_delete_it_in_a_browser(
        browser, tmp_path: Path) -> None:
    admin = verifying_admin_app(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    shots = Path(os.environ["LETHE_CONSOLE_SCREENSHOTS"]) if os.environ.get("LETHE_CONSOLE_SCREENSHOTS") else \
        tmp_path / "shots"
    with served(admin.client.app) as base_url:
        log_in(browser, base_url, ADMIN_KEY, shots)
        target_id = register(browser, base_url, "tess-marlowe", ["Tess Marlowe"], ITEMS, ["guard"],
                             {"reference": "DSR-2026-118", "legal_basis": "gdpr_art17", "received_at": "2026-11-02"},
                             shots)
        watch_until_active(browser, base_url, target_id, 30, shots, between=lambda: run_jobs(admin, tmp_path))
        figures = open_report(browser, base_url, target_id, 30, shots, between=lambda: run_jobs(admin, tmp_path),
                              rerun=True)
        assert figures["leak-before"] == "100.0 %" and figures["leak-after"] == "0.0 %"
        assert figures["detection"] == "100.0 %"
        delete(browser, base_url, target_id, shots)
    assert (shots / "console-report.png").stat().st_size > 10_000
