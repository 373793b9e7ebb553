"""One summary of the benchmarks' latest results, with every goal and whether it is met (what `make bench` ends with).

Each benchmark writes its own JSON to ``bench/results/`` and renders it with its own ``markdown(summary)``; one with
goals also turns it into rows with ``rows(summary)``. This script gathers the ones present into
``bench/results/summary.json``: a list of ``{"metric", "model", "value", "goal", "pass"}`` rows (``goal`` and
``pass`` null where a figure has no goal), and ``bench/results/summary.md``: the same rows as one table, then a
section per benchmark with when its JSON was written. A benchmark that has not been run is listed as missing rather
than silently left out.

    python bench/summary.py
"""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS_DIR = Path(__file__).parent / "results"
# Benchmark module -> the title of its section: those `make bench` runs, in its order, then those run on their own.
BENCHMARKS = {
    "step_time": "One plain-engine decoding step at batch 8, per model",
    "unflagged_traffic": "Unflagged traffic: Lethe vs the same AsyncLLM without it",
    "mechanism_cost": "Flagged traffic: what each mechanism costs, on the bench model",
    "mechanism_quality": "Flagged traffic: what each mechanism protects, on a demo model",
    "classifier_latency": "Classifier latency by number of targets",
    "registry_propagation": "Registry propagation delay",
    "unprotected_window": "Unprotected window: a new target behind a training job",
    "load": "Load: 64 streaming clients, resident memory before and after",
    "detection_scale": "The gate's recall and false positives as targets accumulate",
}
Row = dict[str, object]


def collect(results_dir: Path = RESULTS_DIR) -> tuple[list[Row], str]:
    """(the rows, the markdown summary) of the results present in `results_dir`."""
    rows: list[Row] = []
    sections = []
    for name, title in BENCHMARKS.items():
        path = results_dir / f"{name}.json"
        sections += [f"## {title} (`bench/{name}.py`)", ""]
        if not path.is_file():
            sections += ["not run (no results file)", ""]
            continue
        data = json.loads(path.read_text())
        written = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
        module = importlib.import_module(f"bench.{name}")
        rows += module.rows(data) if hasattr(module, "rows") else []
        sections += [f"measured {written}", "", module.markdown(data), ""]
    return rows, "\n".join(["# Lethe benchmarks", "", table(rows), "", *sections])


def table(rows: list[Row]) -> str:
    """Every figure with a goal or worth a line of its own, the model it was measured on, and pass/fail."""
    lines = ["| metric | model | value | goal | pass |", "| --- | --- | --: | --- | --- |"]
    for row in rows:
        verdict = {True: "pass", False: "**FAIL**", None: ""}[row["pass"]]
        lines.append(f"| {row['metric']} | {Path(str(row['model'])).name} | {_figure(row['value'])} "
                     f"| {row['goal'] or ''} | {verdict} |")
    return "\n".join(lines)


def _figure(value: object) -> str:
    """A float to four significant digits (the JSON keeps it whole); anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    rows, text = collect()
    (RESULTS_DIR / "summary.json").write_text(json.dumps(rows, indent=2))
    (RESULTS_DIR / "summary.md").write_text(text)
    print(text)
    failed = sum(row["pass"] is False for row in rows)
    print(f"written {RESULTS_DIR / 'summary.md'} and summary.json: {len(rows)} rows, {failed} goals missed")


if __name__ == "__main__":
    main()
