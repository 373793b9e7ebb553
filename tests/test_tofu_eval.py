"""`lethe eval tofu` end to end against the session's real server (tiny model, GUARD only, a few questions per set,
two registration seeds).

The tiny model itself stands in for the retain-only model here, so the unprotected run must be indistinguishable
from it: the same replies (vLLM vs HF greedy) and Forget Quality ~1 (served vs in-process scoring agree). GUARD only
touches flagged prompts, so its Model Utility must equal the unprotected one while its forget ROUGE-L collapses.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, run_lethe_eval

SPEC_KEYS = {"mechanisms", "forget_quality", "model_utility", "forget_rouge", "paraphrase_rouge", "retain_rouge",
             "real_authors_acc", "world_facts_acc", "detection_rate", "false_positive_rate"}


@pytest.fixture(scope="module")
def report(lethe_server: RunningServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
           admin: httpx.Client) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval")
    run_lethe_eval(lethe_server, admin, "tofu", "--split", "forget01", "--mechanisms", "guard", "--limit", "6",
                   "--retain-model", str(tiny_model_dir), "--out", str(out), "--membership", "--seeds", "2")
    return json.loads((out / "tofu-forget01.json").read_text()), out


def test_the_report_has_every_run_in_the_spec_shape_and_its_table_and_plot(report: tuple[dict, Path]) -> None:
    data, out = report
    assert data["split"] == "forget01"
    assert [run["name"] for run in data["runs"]] == ["retain-only model", "unprotected", "guard · seed 0",
                                                     "guard · seed 1"]
    assert [run["mechanisms"] for run in data["runs"]] == [[], [], ["guard"], ["guard"]]
    assert [run["seed"] for run in data["runs"]] == [None, None, 0, 1]
    assert data["complete"] is True  # the JSON is rewritten after every run; the last write says it is whole
    for run in data["runs"]:
        assert SPEC_KEYS <= run.keys()
        assert len(run["forget_truth_ratios"]) == 6  # kept, so Forget Quality can be recomputed later
        assert 0 <= run["model_utility"] <= 1 and 0 <= run["forget_quality"] <= 1
    table = (out / "tofu-forget01.md").read_text()
    assert table.count("\n| ") == 6 + 3  # header, separator, 4 runs; over seeds: header, separator, guard
    assert (out / "tofu-forget01.png").read_bytes().startswith(b"\x89PNG")


def test_served_unprotected_model_matches_the_same_model_scored_in_process(report: tuple[dict, Path]) -> None:
    reference, unprotected, *_ = report[0]["runs"]
    assert unprotected["forget_quality"] > 0.9
    for key in ("forget_rouge", "paraphrase_rouge", "retain_rouge", "model_utility", "forget_truth_ratio"):
        assert unprotected[key] == pytest.approx(reference[key], abs=0.05), key
    assert unprotected["detection_rate"] == 0 and reference["detection_rate"] is None


def test_guard_forgets_the_author_and_leaves_model_utility_unchanged(report: tuple[dict, Path]) -> None:
    _, unprotected, guard, _ = report[0]["runs"]
    assert unprotected["forget_rouge"] > 0.8
    assert guard["forget_rouge"] < unprotected["forget_rouge"] - 0.5
    assert guard["detection_rate"] >= 0.9 and guard["false_positive_rate"] <= 0.1
    assert guard["preparation_seconds"] > 0
    # the report keeps what each target's calibration decided, beside the figures it produced
    assert unprotected["calibrated"] == {} and len(guard["calibrated"]) == 2, guard["calibrated"]
    for figures in guard["calibrated"].values():
        assert set(figures) == {"guard"} and figures["guard"]["ban"] > 0, figures
        assert figures["guard"]["limited_by"] in ("reference", "fluency", "leak", "range"), figures
    assert "- guard · seed 0: " in (report[1] / "tofu-forget01.md").read_text()
    if guard["false_positive_rate"] == 0:  # nothing outside the forget set was flagged: identical replies and scores
        assert guard["model_utility"] == pytest.approx(unprotected["model_utility"], abs=1e-6)
        for name, figures in unprotected["utility_sets"].items():
            assert guard["utility_sets"][name] == pytest.approx(figures, abs=1e-6), name
    # GUARD's calibrated ban makes the gold answers' words unlikely, not impossible. How unlikely depends on the ban
    # its calibration found on this CPU: 0.16 of the unprotected probability on an Intel Xeon (AMX), where the
    # fluency bar capped the ban at 12, under a tenth on an AMD EPYC (ban 21).
    assert guard["forget_probability"] < unprotected["forget_probability"] / 2


def test_membership_adds_each_served_runs_distinguisher_auc(report: tuple[dict, Path]) -> None:
    data, out = report
    reference, unprotected, guard, _ = data["runs"]
    assert reference["membership_auc"] is None  # the retain-only model is not served
    assert 0 <= guard["membership_auc"] <= 1
    assert unprotected["membership_auc"] > 0.8  # it knows its forget01 authors, not the never-seen ones
    assert "membership AUC |" in (out / "tofu-forget01.md").read_text()


def test_each_seed_is_a_registration_of_its_own_and_the_report_gives_their_median_and_range(
        report: tuple[dict, Path]) -> None:
    data, out = report
    runs = {run["name"]: run for run in data["runs"]}
    [group] = data["over_seeds"]
    assert group["mechanisms"] == ["guard"] and group["seeds"] == [0, 1]
    for key in ("forget_quality", "model_utility", "forget_rouge", "fluency", "membership_auc"):
        values = sorted(runs[f"guard · seed {seed}"][key] for seed in (0, 1))
        assert group["figures"][key] == pytest.approx({"min": values[0], "max": values[1],
                                                       "median": (values[0] + values[1]) / 2}), key
    for seed in (0, 1):  # each seed protects on its own
        assert runs[f"guard · seed {seed}"]["forget_rouge"] < runs["unprotected"]["forget_rouge"] - 0.5
    assert "Over registration seeds" in (out / "tofu-forget01.md").read_text()
