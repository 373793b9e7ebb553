"""`make bench`'s summary: every benchmark's JSON gathered and rendered by that benchmark's own markdown; every
benchmark script importable."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from bench.summary import BENCHMARKS, collect, table


def test_summary_renders_present_results_and_names_missing_ones(tmp_path):
    propagation = {"poll_s": 0.5, "results": {"sqlite": {"n": 3, "p50_s": 0.25, "p99_s": 0.41, "max_s": 0.41}}}
    (tmp_path / "registry_propagation.json").write_text(json.dumps(propagation))
    rows, text = collect(tmp_path)
    assert rows == []  # a benchmark without goals adds its section, no rows
    assert "| sqlite | 0.250 s | 0.410 s | 0.410 s |" in text
    assert "poll every 0.5 s, 3 changes" in text
    assert text.count("not run (no results file)") == len(BENCHMARKS) - 1
    for name in BENCHMARKS:
        assert f"`bench/{name}.py`" in text


def test_every_goal_becomes_a_row_with_its_model_and_a_verdict(tmp_path):
    """summary.json's rows: {metric, model, value, goal, pass}; a missed goal is a FAIL in the table."""
    cost = {"model": "/cache/bench-1", "rounds": 3, "max_tokens": 64, "preparation_seconds": 9.0, "table": {
        f"{name} @ {c}": {"tokens_per_s": 100.0, "cost_ratio": ratio, "ttft_p50_ms": 10.0, "hit_share": 1.0}
        for c in (1, 8, 32)
        for name, ratio in {"unprotected": 1.0, "eco": 1.02, "guard": 1.2, "uld": 1.3, "o3": 1.1,
                            "eco+guard": 1.15, "all four": 1.7}.items()}}
    step = {"batch": 8, "prompt_tokens": 32, "max_tokens": 64, "rounds": 3, "cpus": 2, "rows": [
        {"name": "tiny", "model": "/cache/tiny-1", "params": 9e5, "step_ms": 1.2, "decode_tokens_per_s": 1.0,
         "prefill_ms": 1.0},
        {"name": "bench", "model": "/cache/bench-1", "params": 8.8e7, "step_ms": 54.5, "decode_tokens_per_s": 1.0,
         "prefill_ms": 1.0}]}
    (tmp_path / "mechanism_cost.json").write_text(json.dumps(cost))
    (tmp_path / "step_time.json").write_text(json.dumps(step))
    rows, text = collect(tmp_path)
    assert all(set(row) == {"metric", "model", "value", "goal", "pass"} for row in rows)
    verdicts = {row["metric"]: (row["value"], row["goal"], row["pass"]) for row in rows}
    assert verdicts["flagged cost ratio, eco, concurrency 8"] == (1.02, "<= 1.05", True)
    assert verdicts["flagged cost ratio, guard, concurrency 8"] == (1.2, "<= 1.1", False)
    assert verdicts["flagged cost ratio, all four, concurrency 8"] == (1.7, "<= 1.6", False)
    assert verdicts["flagged cost ratio, eco+guard, concurrency 8"] == (1.15, None, None)
    step_rows = [row for row in rows if row["metric"].startswith("plain-engine")]
    assert [(row["model"], row["pass"]) for row in step_rows] == [("/cache/tiny-1", None), ("/cache/bench-1", True)]
    assert "| flagged cost ratio, guard, concurrency 8 | bench-1 | 1.2 | <= 1.1 | **FAIL** |" in text
    assert text.index("| metric | model |") < text.index("## ")  # the one table first, sections after


def test_the_gate_keeps_its_recall_floor_by_count_and_figures_print_four_digits(tmp_path):
    """596 of 601 paraphrases caught is the floor (docs/gate.md's "0.992" rounds it), not a miss; a float prints
    to four significant digits."""
    cell = {"false_positive_rate": 0.0, "n": 600, "upper_95": 0.005}
    joint = {"held_back_questions": {"recall": 494 / 500}, "paraphrased_questions": {"recall": 596 / 601},
             "unregistered_tofu_authors": cell, "world_real_authors_chat": cell}
    sizes = [{"targets": 100, "joint": joint, "latency": {"p50_ms": 6.638274498982355}}]
    from bench.detection_scale import rows

    verdicts = {row["metric"]: row["pass"] for row in rows({"sizes": sizes})}
    assert verdicts["gate recall, paraphrased questions, 100 targets"] is True
    assert verdicts["gate recall, held back questions, 100 targets"] is True
    joint["paraphrased_questions"]["recall"] = 595 / 601
    assert not {row["metric"]: row["pass"] for row in rows({"sizes": sizes})}[
        "gate recall, paraphrased questions, 100 targets"]
    text = table(rows({"sizes": sizes}))
    assert "| 0.99 | >= 0.9917 | **FAIL** |" in text and "| 6.638 |" in text


@pytest.mark.parametrize("script", sorted(path.stem for path in (Path(__file__).parent.parent / "bench").glob("*.py")))
def test_every_benchmark_script_imports(script: str) -> None:
    """`make bench` runs outside the suite: a moved module must not first break it there."""
    importlib.import_module(f"bench.{script}")
