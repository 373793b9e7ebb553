"""The web console in a real headless Chromium against the real server (the session's ``lethe serve`` with its vLLM
engine and the tiny demo model): log in, register a forget01 author from the form with its 20 QA items and GUARD,
watch it become active, open its report once the verification job has run through the engine, check its leak rates
before → after, delete it. Its screenshots are the docs' (``docs/images/console-*.png``, ``docs/compliance.md``).

Runs alone too (``pytest tests/test_console_browser.py``): it needs only the ``lethe_server`` fixture, and leaves the
registry as it found it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from demo.tofu_data import authors_of
from tests.browser import chromium_driver
from tests.conftest import ADMIN_KEY, RunningServer, remove_targets
from tests.console_walk import delete, log_in, open_report, register, watch_until_active

ACTIVE_TIMEOUT_S = 300  # classifier fit and GUARD's phrases: seconds, behind whatever an earlier module queued
REPORT_TIMEOUT_S = 900  # the verification: ~120 probes, each asked with and without protection, plus negatives


@pytest.fixture
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def test_a_forget01_author_registered_in_the_console_becomes_active_and_its_report_shows_leaks_before_and_after(
        browser, lethe_server: RunningServer, admin: httpx.Client, tmp_path: Path) -> None:
    # Screenshots go to a temporary folder unless asked for (a test run leaves the working tree as it found it):
    # LETHE_CONSOLE_screenshots=docs/images refreshes the walk-through's pictures.
    screenshots = Path(os.environ["LETHE_CONSOLE_screenshots"]) if os.environ.get("LETHE_CONSOLE_screenshots") \
        else tmp_path
    author = authors_of("forget01")[0]
    name = "console-" + re.sub(r"[^a-z0-9]+", "-", author.name.lower()).strip("-")
    items = [(item.question, item.answer) for item in author.items]
    assert len(items) == 20
    started = time.monotonic()
    target_id = None
    try:
        log_in(browser, lethe_server.base_url, ADMIN_KEY, screenshots)
        target_id = register(browser, lethe_server.base_url, name, [author.name], items, ["guard"],
                             {"reference": "DSR-2026-118", "legal_basis": "gdpr_art17", "received_at": "2026-11-02"},
                             screenshots)
        watch_until_active(browser, lethe_server.base_url, target_id, ACTIVE_TIMEOUT_S, screenshots)
        queued = [job for job in admin.get(f"/targets/{target_id}").json()["jobs"] if job["kind"] == "verify_erasure"]
        # The suite's servers run with LETHE_VERIFY_AFTER_CHANGES=false (tests/conftest.py): the report's button
        # queues the run; a server with the default has queued it at the registration already.
        figures = open_report(browser, lethe_server.base_url, target_id, REPORT_TIMEOUT_S, screenshots,
                              rerun=not queued)
        report = admin.get(f"/targets/{target_id}/report").json()
        summary = report["verification"]["summary"]
        print(f"\nconsole browser test: {author.name}: {summary} ({time.monotonic() - started:.0f} s)")
        assert all(value.endswith("%") for value in figures.values()), figures
        assert summary["probes"] >= 60 and summary["leak_rate_before"] is not None
        assert summary["leak_rate_after"] < summary["leak_rate_before"], summary  # the model knows its authors
        assert summary["detection_rate"] >= 0.8, summary
        delete(browser, lethe_server.base_url, target_id, screenshots)
        tombstone = admin.get("/tombstones", params={"target_id": target_id}).json()["data"][0]
        assert tombstone["verification"]["leak_rate_after"] == summary["leak_rate_after"]
        target_id = None
    finally:
        if target_id is not None:
            remove_targets(admin, [target_id])
    assert (screenshots / "console-report.png").exists()
