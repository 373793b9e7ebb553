"""`make bench`'s summary: every benchmark's JSON gathered and rendered by that benchmark's own markdown; every
benchmark script importable."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from bench.summary import BENCHMARKS, collect


def test_summary_renders_present_results_and_names_missing_ones(tmp_path):
    propagation = {"poll_s": 0.5, "results": {"sqlite": {"n": 3, "p50_s": 0.25, "p99_s": 0.41, "max_s": 0.41}}}
    (tmp_path / "registry_propagation.json").write_text(json.dumps(propagation))
    found, text = collect(tmp_path)
    assert found == {"registry_propagation": propagation}
    assert "| sqlite | 0.250 s | 0.410 s | 0.410 s |" in text
    assert "poll every 0.5 s, 3 changes" in text
    assert text.count("not run (no results file)") == len(BENCHMARKS) - 1
    for name in BENCHMARKS:
        assert f"`bench/{name}.py`" in text


@pytest.mark.parametrize("script", sorted(path.stem for path in (Path(__file__).parent.parent / "bench").glob("*.py")))
def test_every_benchmark_script_imports(script: str) -> None:
    """`make bench` runs outside the suite: a moved module must not first break it there."""
    importlib.import_module(f"bench.{script}")
