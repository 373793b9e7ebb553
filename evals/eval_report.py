"""The evaluation's outputs besides the JSON: a markdown table and the papers' Forget Quality vs Model Utility plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.membership import MembershipRun
from evals.tofu_eval import CALIBRATED_STRENGTHS, RunResult, SeededFigures, over_seeds


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(split: str, model: str, runs: Sequence[RunResult]) -> str:
    membership = any(run.membership_auc is not None for run in runs)  # `lethe eval tofu --membership`
    lines = [
        f"TOFU {split} on `{model}` (forget quality: KS p-value vs the retain-only model; ROUGE-L recall; "
        "accuracy: true answer likelier than every wrong option"
        + ("; membership AUC: replies about forgotten vs never-seen authors told apart, 0.5 = not at all)"
           if membership else ")"),
        "",
        "| run | forget quality | model utility | forget ROUGE-L | paraphrase ROUGE-L | retain ROUGE-L "
        "| real authors acc | world facts acc | detection | false positives | fluency | preparation |"
        + (" membership AUC |" if membership else ""),
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |" + (" --: |" if membership else ""),
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.forget_quality:.3g} | {run.model_utility:.3f} | {run.forget_rouge:.3f} "
            f"| {run.paraphrase_rouge:.3f} | {run.retain_rouge:.3f} | {run.real_authors_acc:.2f} "
            f"| {run.world_facts_acc:.2f} | {_rate(run.detection_rate)} | {_rate(run.false_positive_rate)} "
            f"| {run.fluency:.2f} | {run.preparation_seconds:.0f} s |"
            + (f" {_rate(run.membership_auc)} |" if membership else ""))
    calibrated = [run for run in runs if run.calibrated]
    if calibrated:
        lines += ["", "Calibrated per target (strength, and the bound that set it):", ""]
        lines += [f"- {run.name}: " + "; ".join(
            f"{target}: " + ", ".join(_strength(name, figures) for name, figures in mechanisms.items())
            for target, mechanisms in run.calibrated.items()) for run in calibrated]
    seeded = [group for group in over_seeds(runs) if len(group.seeds) > 1]
    if seeded:
        lines += ["", *seeds_table(seeded)]
    return "\n".join(lines) + "\n"


def _strength(mechanism: str, figures: dict) -> str:
    """``guard ban 22.2 (reference)``: a mechanism's calibrated strength and the bound that decided it (a ban of None
    is GUARD's outright one)."""
    strengths = " ".join(f"{key} {'outright' if figures[key] is None else format(figures[key], '.3g')}"
                         for key in CALIBRATED_STRENGTHS if key in figures)
    bound = f" ({figures['limited_by']})" if figures.get("limited_by") else ""
    return f"{mechanism} {strengths}{bound}"


def seeds_table(groups: Sequence[SeededFigures]) -> list[str]:
    """Each configuration registered with several preparation seeds: the median of each figure, its range after."""
    keys = [key for key in ("forget_quality", "model_utility", "forget_rouge", "fluency", "membership_auc")
            if any(key in group.figures for group in groups)]
    lines = ["Over registration seeds (median, then min–max):", "",
             "| configuration | seeds | " + " | ".join(key.replace("_", " ") for key in keys) + " |",
             "| --- | --- |" + " --: |" * len(keys)]
    for group in groups:
        cells = []
        for key in keys:
            figure = group.figures.get(key)
            cells.append("—" if figure is None else
                         f"{figure['median']:.3g} ({figure['min']:.3g}–{figure['max']:.3g})")
        lines.append(f"| {group.name} | {', '.join(map(str, group.seeds))} | " + " | ".join(cells) + " |")
    return lines


def membership_table(split: str, model: str, runs: Sequence[MembershipRun], top: int = 3) -> str:
    """One row per configuration: the AUC, its interval, the refusal rate per class and the weightiest features."""
    sizes = runs[0] if runs else None
    lines = [
        f"Membership on `{model}`, {split}"
        + (f": {sizes.registered_authors} registered vs {sizes.never_seen_authors} never-seen authors, "
           f"{sizes.questions} questions" if sizes else "")
        + " (logistic regression on reply features, author-level cross-validation; AUC 0.5: indistinguishable; "
        "the goal when protected: ≤ 0.6)",
        "",
        "| run | AUC | 95 % interval | refusals, registered | refusals, never-seen "
        "| top features (standardised coefficient) | preparation |",
        "| --- | --: | --: | --: | --: | --- | --: |",
    ]
    for run in runs:
        low, high = run.auc_interval
        weights = ", ".join(f"{name} {value:+.2f}" for name, value in list(run.coefficients.items())[:top])
        lines.append(
            f"| {run.name} | {run.auc:.2f} | {low:.2f}–{high:.2f} | {run.feature_means['registered']['refused']:.2f} "
            f"| {run.feature_means['never_seen']['refused']:.2f} | {weights} | {run.preparation_seconds:.0f} s |")
    for run in runs:  # what tells them apart, run by run
        lines += ["", f"**{run.name}**: feature means by class, each feature's AUC alone, its coefficient", "",
                  "| feature | registered | never-seen | AUC alone | coefficient |", "| --- | --: | --: | --: | --: |"]
        means = run.feature_means
        lines += [f"| {name} | {means['registered'][name]:.3g} | {means['never_seen'][name]:.3g} "
                  f"| {run.feature_auc[name]:.2f} | {run.coefficients[name]:+.2f} |" for name in run.feature_auc]
    return "\n".join(lines) + "\n"


def plot(split: str, runs: Sequence[RunResult], path: Path) -> None:
    """Model Utility (x) against Forget Quality (y, log scale), one labelled point per run, as in the papers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
    for run in runs:
        quality = max(run.forget_quality, 1e-30)  # a p-value of 0 cannot sit on a log axis
        axes.scatter(run.model_utility, quality, s=40)
        axes.annotate(run.name, (run.model_utility, quality), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("Model Utility")
    axes.set_ylabel("Forget Quality (KS p-value)")
    axes.set_title(f"TOFU {split}: forget quality vs model utility")
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
