"""The erasure report's figures as inline SVG (matplotlib, a dependency already): leak rate before → after per probe
family, each probe's score before against after, and the target's hits per day.

Every label is Lethe's own (family names, dates, numbers): no text of the target reaches a plot, so the SVG can be
embedded in a page as it is. Text stays text (``svg.fonttype: none``): small, and readable by a screen reader.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

FAMILY_LABELS = {"question": "questions", "rephrased": "rephrased", "rebuilt": "rebuilt", "alias": "other alias",
                 "free_form": "free-form", "completion": "completion"}
BEFORE, AFTER, NEUTRAL = "#b8472f", "#2f6fb8", "#777777"


def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt.subplots(figsize=(width, height))


def leak_rates_svg(families: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Grouped bars: share of probes whose reply leaked, without and with protection, per family and overall."""
    rows = [(FAMILY_LABELS.get(f["family"], f["family"]), f["leaked_before"] / f["probes"],
             f["leaked_after"] / f["probes"]) for f in families if f["probes"]]
    rows.append(("all probes", summary.get("leak_rate_before") or 0.0, summary.get("leak_rate_after") or 0.0))
    figure, axes = _figure(6.4, 2.8)
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r[1] * 100 for r in rows], 0.4, color=BEFORE, label="without protection")
    axes.bar([p + 0.2 for p in positions], [r[2] * 100 for r in rows], 0.4, color=AFTER, label="with protection")
    axes.set_xticks(list(positions), [r[0] for r in rows], rotation=20, ha="right")
    axes.set_ylabel("replies that leak (%)")
    axes.set_ylim(0, 100)
    axes.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    return _svg(figure)


def scores_svg(before: Sequence[float], after: Sequence[float], threshold: float) -> str:
    """Each probe's leak score without protection (x) against with protection (y); the dashed lines are the leak
    threshold."""
    figure, axes = _figure(3.4, 3.0)
    axes.scatter(before, after, s=12, color=AFTER, alpha=0.6)
    axes.axvline(threshold, color=NEUTRAL, linestyle="--", linewidth=0.8)
    axes.axhline(threshold, color=NEUTRAL, linestyle="--", linewidth=0.8)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("score without protection")
    axes.set_ylabel("score with protection")
    return _svg(figure)


def hits_svg(by_day: Sequence[Mapping[str, Any]]) -> str:
    """Requests that hit the target, per UTC day (client traffic: verification probes are not audited)."""
    figure, axes = _figure(6.4, 2.2)
    days = [row["day"] for row in by_day]
    axes.bar(range(len(days)), [row["hits"] for row in by_day], color=NEUTRAL)
    step = max(1, len(days) // 8)
    axes.set_xticks(list(range(0, len(days), step)), days[::step], rotation=20, ha="right")
    axes.set_ylabel("hits per day")
    return _svg(figure)


def report_plots(report: Mapping[str, Any]) -> dict[str, str]:
    """The SVG figures a report has data for, by name (``leaks``, ``scores``, ``hits``)."""
    plots: dict[str, str] = {}
    verification = report.get("verification")
    if verification:
        plots["leaks"] = leak_rates_svg(verification["families"], verification["summary"])
        scores = verification.get("scores") or {}
        if scores.get("before"):
            plots["scores"] = scores_svg(scores["before"], scores["after"], verification["threshold"])
    if report["hits"]["by_day"]:
        plots["hits"] = hits_svg(report["hits"]["by_day"])
    return plots
