"""`lethe eval membership` end to end against the session's real server (tiny model, forget01: 2 registered authors
against 2 never-seen ones, 6 questions each, unprotected then GUARD).

The tiny model memorised its forget01 authors and never saw the held-out ones, so unprotected the distinguisher must
tell them apart (or it proves nothing about the protected run); the protected run's AUC is reported, not judged here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from evals.membership import FEATURE_NAMES
from tests.conftest import RunningServer, run_lethe_eval


@pytest.fixture(scope="module")
def report(lethe_server: RunningServer, tmp_path_factory: pytest.TempPathFactory,
           admin: httpx.Client) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("membership")
    run_lethe_eval(lethe_server, admin, "membership", "--split", "forget01", "--mechanisms", "guard",
                   "--questions-per-author", "6", "--out", str(out))
    return json.loads((out / "membership-forget01.json").read_text()), out


def test_the_report_has_both_runs_with_a_finite_auc_and_its_table(report: tuple[dict, Path]) -> None:
    data, out = report
    assert data["complete"] is True and data["split"] == "forget01"
    assert data["registered_authors"] == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    assert len(data["never_seen_authors"]) == 2 and list(data["features"]) == list(FEATURE_NAMES)
    assert [run["name"] for run in data["runs"]] == ["unprotected", "guard"]
    for run in data["runs"]:
        assert math.isfinite(run["auc"]) and 0 <= run["auc"] <= 1
        low, high = run["auc_interval"]
        assert low <= run["auc"] <= high
        assert run["questions"] == 24 and set(run["feature_means"]) == {"registered", "never_seen"}
    table = (out / "membership-forget01.md").read_text()
    assert "| unprotected |" in table and "| guard |" in table


def test_unprotected_the_distinguisher_tells_known_authors_from_never_seen_ones(report: tuple[dict, Path]) -> None:
    unprotected = report[0]["runs"][0]
    assert unprotected["auc"] > 0.8
    means = unprotected["feature_means"]
    assert means["registered"]["answer_nll"] < means["never_seen"]["answer_nll"]  # it knows their answers
    assert report[0]["runs"][1]["preparation_seconds"] > 0
