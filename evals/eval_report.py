"""The evaluation's outputs besides the JSON: a markdown table and the papers' Forget Quality vs Model Utility plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.tofu_eval import RunResult


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(split: str, model: str, runs: Sequence[RunResult]) -> str:
    lines = [
        f"TOFU {split} on `{model}` (forget quality: KS p-value vs the retain-only model; ROUGE-L recall; "
        "accuracy: true answer likelier than every wrong option)",
        "",
        "| run | forget quality | model utility | forget ROUGE-L | paraphrase ROUGE-L | retain ROUGE-L "
        "| real authors acc | world facts acc | detection | false positives | fluency | preparation |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.forget_quality:.3g} | {run.model_utility:.3f} | {run.forget_rouge:.3f} "
            f"| {run.paraphrase_rouge:.3f} | {run.retain_rouge:.3f} | {run.real_authors_acc:.2f} "
            f"| {run.world_facts_acc:.2f} | {_rate(run.detection_rate)} | {_rate(run.false_positive_rate)} "
            f"| {run.fluency:.2f} | {run.preparation_seconds:.0f} s |")
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
