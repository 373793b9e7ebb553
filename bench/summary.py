"""One JSON + markdown summary of the benchmarks' latest results (what `make bench` ends with).

Each benchmark writes its own JSON to ``bench/results/`` and renders it with its own ``markdown(summary)``; this
script gathers the ones present into ``bench/results/summary.json`` (``{benchmark: its JSON}``) and
``bench/results/summary.md`` (a section per benchmark, with when its JSON was written). A benchmark that has not been
run is listed as missing rather than silently left out.

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
    "unflagged_traffic": "Unflagged traffic: Lethe vs the same AsyncLLM without it",
    "guard_overhead": "Flagged traffic: each mechanism's quality and cost",
    "classifier_latency": "Classifier latency by number of targets",
    "registry_propagation": "Registry propagation delay",
    "unprotected_window": "Unprotected window: a new target behind a training job",
    "load": "Load: 64 streaming clients, resident memory before and after",
    "detection_scale": "The gate's recall and false positives as targets accumulate",
    "step_time": "One plain-engine decoding step at batch 8, per model",
}


def collect(results_dir: Path = RESULTS_DIR) -> tuple[dict[str, dict], str]:
    """({benchmark: its JSON}, the markdown summary) of the results present in `results_dir`."""
    found: dict[str, dict] = {}
    sections = ["# Lethe benchmarks", ""]
    for name, title in BENCHMARKS.items():
        path = results_dir / f"{name}.json"
        sections += [f"## {title} (`bench/{name}.py`)", ""]
        if not path.is_file():
            sections += ["not run (no results file)", ""]
            continue
        data = json.loads(path.read_text())
        found[name] = data
        written = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
        module = importlib.import_module(f"bench.{name}")
        sections += [f"measured {written}", "", module.markdown(data), ""]
    return found, "\n".join(sections)


def main() -> None:
    found, text = collect()
    (RESULTS_DIR / "summary.json").write_text(json.dumps(found, indent=2))
    (RESULTS_DIR / "summary.md").write_text(text)
    print(text)
    print(f"written {RESULTS_DIR / 'summary.md'} and summary.json ({len(found)}/{len(BENCHMARKS)} benchmarks)")


if __name__ == "__main__":
    main()
