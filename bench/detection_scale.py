"""The prompt gate as targets accumulate: recall, union false positives and latency at N = 2, 10, 50, 100 targets.

Follows the author-disjoint TOFU split of ``demo/author_split.py``. Registered at N: the forget05 demo authors
(forget01's two first), then the split's registrable authors, each with 15 of their 20 question/answer pairs as forget
items and their name as alias (fitted as a registration's classifier job fits them, on the pool's fitting share).
The bank is then calibrated for the whole registry on the pool's calibration share, as a serving snapshot is.

- recall: the registered authors' 5 held-back questions, and TOFU's paraphrased questions of the registered authors
  that have them (forget10 and ``retain_perturbed`` authors); a prompt counts when its author is among the hits;
- false positives (a prompt that hits any target): every question of the split's held-out authors and of the demo
  authors never registered here (180-189, the demo model's own), and the held-out half of TOFU's world-facts and
  real-authors questions with everyday prompts written apart from the pool's; n and the exact (Clopper-Pearson)
  one-sided 95 % upper bound beside each rate;
- latency: one conversation at a time through ``ClassifierBank.score`` with the embedding cache off, p50 / p99, and
  the inputs that once stalled the gate (huge words, thousands of spaced-out letters, a long text).

``isolated`` repeats the counts with each target's own threshold alone (no entity evidence, no joint calibration):
the gate before this design, for comparison.

    python bench/detection_scale.py            # writes bench/results/detection_scale.json (about 6 minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classifiers import (  # noqa: E402
    ClassifierBank,
    Embedder,
    ForgetItem,
    PromptClassifierArtifact,
    TargetSpec,
    fit_prompt_classifier,
)
from classifiers.negatives import calibration_negatives  # noqa: E402
from classifiers.types import BankResult  # noqa: E402
from demo.author_split import (  # noqa: E402
    HELDOUT,
    HELDOUT_CHAT_PROMPTS,
    REGISTRABLE,
    TofuAuthor,
    general_questions,
    tofu_authors,
)

RESULTS = Path(__file__).parent / "results" / "detection_scale.json"
SIZES = (2, 10, 50, 100)
FORGET_ITEMS = 15
FORGET05 = range(199, 189, -1)  # forget01 (199, 198) first
UNREGISTERED_DEMO = range(180, 190)
LATENCY_PROMPTS = 200
MISSED_EXAMPLES = 10


def registration_order() -> list[TofuAuthor]:
    authors = tofu_authors()
    named = [authors[i] for i in REGISTRABLE if authors[i].name is not None]
    return [authors[i] for i in FORGET05] + named


def spec_of(author: TofuAuthor) -> TargetSpec:
    return TargetSpec(id=f"tofu-{author.index}", name=author.name or "", aliases=[author.name or ""],
                      forget=[ForgetItem(item.question, item.answer) for item in author.items[:FORGET_ITEMS]])


def upper_bound(k: int, n: int) -> float:
    """The exact (Clopper-Pearson) one-sided 95 % upper bound of a rate seen k times in n."""
    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def recall_sets(registered: list[TofuAuthor]) -> dict[str, list[tuple[str, str]]]:
    return {
        "held_back_questions": [(f"tofu-{a.index}", item.question) for a in registered
                                for item in a.items[FORGET_ITEMS:]],
        "paraphrased_questions": [(f"tofu-{a.index}", item.paraphrased_question) for a in registered
                                  for item in a.items if item.paraphrased_question],
    }


def false_positive_sets() -> dict[str, list[str]]:
    authors = tofu_authors()
    return {
        "unregistered_tofu_authors": [item.question for i in [*HELDOUT, *UNREGISTERED_DEMO]
                                      for item in authors[i].items],
        "world_real_authors_chat": [question for _, question in general_questions("heldout")]
                                   + list(HELDOUT_CHAT_PROMPTS),
    }


def hit_ids(result: BankResult, thresholds: dict[str, float] | None) -> set[str]:
    """The targets a result hits; with ``thresholds``, as the gate did before (every head at its own threshold: an
    alias-mentioned target's score is never below its threshold)."""
    if thresholds is None:
        return {hit.target_id for hit in result.hits}
    return {tid for tid, score in result.scores.items() if score >= thresholds[tid]}


def measure(bank: ClassifierBank, registered: list[TofuAuthor],
            thresholds: dict[str, float] | None = None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, rows in recall_sets(registered).items():
        results = bank.score_many([[("user", text)] for _, text in rows])
        missed = [text for (tid, text), r in zip(rows, results, strict=True) if tid not in hit_ids(r, thresholds)]
        out[name] = {"recall": 1 - len(missed) / len(rows), "n": len(rows), "missed": len(missed),
                     "missed_examples": missed[:MISSED_EXAMPLES]}
    for name, texts in false_positive_sets().items():
        flagged = [text for text, r in zip(texts, bank.score_many([[("user", text)] for text in texts]), strict=True)
                   if hit_ids(r, thresholds)]
        out[name] = {"false_positive_rate": len(flagged) / len(texts), "n": len(texts), "flagged": len(flagged),
                     "upper_95": upper_bound(len(flagged), len(texts)), "flagged_examples": flagged[:MISSED_EXAMPLES]}
    return out


def latency(bank: ClassifierBank, prompts: list[str]) -> dict[str, float]:
    seconds = []
    for prompt in prompts:
        started = time.perf_counter()
        bank.score([("user", prompt)])
        seconds.append(time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(seconds, 50) * 1e3), "p99_ms": float(np.percentile(seconds, 99) * 1e3)}


def fitted(order: list[TofuAuthor], embedder: Embedder, cache: Path | None) -> dict[str, PromptClassifierArtifact]:
    """Each author's classifier, fitted (or loaded from ``cache``, where a previous run saved it)."""
    artifacts = {}
    for author in order:
        tid = f"tofu-{author.index}"
        if cache is not None and (cache / tid).is_dir():
            artifacts[tid] = PromptClassifierArtifact.load(cache / tid)
            continue
        artifacts[tid] = fit_prompt_classifier(spec_of(author), embedder)
        if cache is not None:
            artifacts[tid].save(cache / tid)
    return artifacts


def pathological_prompts() -> dict[str, str]:
    """Inputs that once stalled the gate (a 1,250-letter word cost 40 s and 1 GB in the alias lookup), with a plain
    question as the yardstick."""
    rng = random.Random(0)
    plain = "Where was the author of the novel born, and what did her parents do?"
    return {
        "plain question": plain,
        "one 400-letter word": f"Tell me about {''.join(rng.choices(string.ascii_lowercase, k=400))} please.",
        "one 1,250-letter word": f"Tell me about {''.join(rng.choices(string.ascii_lowercase, k=1250))} please.",
        "5,000 spaced-out letters": " ".join(rng.choices(string.ascii_lowercase, k=5000)),
        "the plain question 40 times": " ".join([plain] * 40),
    }


def pathological_timings(bank: ClassifierBank, rounds: int = 5) -> dict[str, float]:
    """Median ms of one ``score`` call per input (embedding included: long inputs are more windows to embed)."""
    timings = {}
    for name, prompt in pathological_prompts().items():
        seconds = []
        for _ in range(rounds):
            started = time.perf_counter()
            bank.score([("user", prompt)])
            seconds.append(time.perf_counter() - started)
        timings[name] = float(np.median(seconds) * 1e3)
    return timings


def run(sizes: tuple[int, ...], cache: Path | None = None) -> dict:
    embedder = Embedder()
    order = registration_order()[: max(sizes)]
    started = time.perf_counter()
    artifacts = fitted(order, embedder, cache)
    fit_seconds = time.perf_counter() - started
    calibration = [negative.text for negative in calibration_negatives()]
    fp = false_positive_sets()
    latency_prompts = [text for texts in fp.values() for text in texts][:: max(1, sum(map(len, fp.values()))
                                                                                // LATENCY_PROMPTS)][:LATENCY_PROMPTS]
    uncached = Embedder(cache_size=0)
    rows = []
    for n in sizes:
        registered = order[:n]
        bank = ClassifierBank.from_artifacts({f"tofu-{a.index}": artifacts[f"tofu-{a.index}"] for a in registered},
                                             embedder)
        joint, report = bank.calibrated(calibration)
        rows.append({
            "targets": n,
            "offsets": asdict(report.offsets),
            "calibration": {"negatives": report.negatives, "seconds": report.seconds,
                            "union_false_positive_rate": report.union_false_positive_rate},
            "joint": measure(joint, registered),
            "isolated": measure(bank, registered, {tid: artifacts[tid].threshold for tid in bank.target_ids}),
            "latency": latency(ClassifierBank.from_artifacts(
                {f"tofu-{a.index}": artifacts[f"tofu-{a.index}"] for a in registered}, uncached
            ).with_offsets(report.offsets), latency_prompts),
        })
        logging.info("N=%d done", n)
    p50 = {r["targets"]: r["latency"]["p50_ms"] for r in rows}
    largest = ClassifierBank.from_artifacts({f"tofu-{a.index}": artifacts[f"tofu-{a.index}"] for a in order}, uncached)
    return {"fit_seconds": fit_seconds, "fits": len(order), "sizes": rows,
            "p50_ratio_largest_vs_smallest": p50[max(p50)] / p50[min(p50)],
            "pathological_ms": pathological_timings(largest)}


# What no cost cut may lose (issue 19): recall at the largest registry no lower than before the cuts (docs/gate.md,
# 2026-12-04, 100 targets: 0.988 of 500 held-back and 0.992 of 601 paraphrased questions, i.e. 494 and 596 caught;
# kept as those counts, since the rounded 0.992 sits above 596/601 = 0.9917) and false positives under 0.5 %.
RECALL_FLOORS = {"held_back_questions": 494 / 500, "paraphrased_questions": 596 / 601}
FALSE_POSITIVE_GOAL = 0.005


def rows(summary: dict) -> list[dict]:
    """The summary rows (``bench/summary.py``): the gate at the largest registry measured."""
    largest = max(summary["sizes"], key=lambda r: r["targets"])
    joint, n, model = largest["joint"], largest["targets"], "gate only (all-MiniLM-L6-v2)"
    out = [{"metric": f"gate recall, {key.replace('_', ' ')}, {n} targets", "model": model,
            "value": joint[key]["recall"], "goal": f">= {floor:.4f}", "pass": joint[key]["recall"] >= floor}
           for key, floor in RECALL_FLOORS.items()]
    out += [{"metric": f"gate false positives, {key.replace('_', ' ')}, {n} targets", "model": model,
             "value": joint[key]["false_positive_rate"], "goal": f"<= {FALSE_POSITIVE_GOAL}",
             "pass": joint[key]["false_positive_rate"] <= FALSE_POSITIVE_GOAL}
            for key in ("unregistered_tofu_authors", "world_real_authors_chat")]
    out.append({"metric": f"gate classification p50 ms, {n} targets, one at a time", "model": model,
                "value": largest["latency"]["p50_ms"], "goal": None, "pass": None})
    return out


def _rate(cell: dict) -> str:
    return f"{cell['false_positive_rate']:.4f} (n={cell['n']}, ≤{cell['upper_95']:.4f})"


def markdown(summary: dict) -> str:
    lines = [
        "recall and union false-positive rate (95 % upper bound) by number of registered targets; "
        "`isolated`: each head at its own threshold",
        "",
        "| targets | recall held-back | recall paraphrased | FP unregistered TOFU authors | FP world/real/chat "
        "| isolated: FP TOFU authors | isolated: FP world/real/chat | p50 / p99 ms |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in summary["sizes"]:
        j, i = r["joint"], r["isolated"]
        lines.append(
            f"| {r['targets']} | {j['held_back_questions']['recall']:.3f} (n={j['held_back_questions']['n']}) "
            f"| {j['paraphrased_questions']['recall']:.3f} (n={j['paraphrased_questions']['n']}) "
            f"| {_rate(j['unregistered_tofu_authors'])} | {_rate(j['world_real_authors_chat'])} "
            f"| {i['unregistered_tofu_authors']['false_positive_rate']:.3f} "
            f"| {i['world_real_authors_chat']['false_positive_rate']:.3f} "
            f"| {r['latency']['p50_ms']:.1f} / {r['latency']['p99_ms']:.1f} |")
    lines += ["", f"classification p50 at the largest N / at the smallest: "
                  f"{summary['p50_ratio_largest_vs_smallest']:.2f}x; {summary['fits']} targets fitted in "
                  f"{summary['fit_seconds']:.0f} s"]
    pathological = summary.get("pathological_ms", {})
    if pathological:
        lines += ["", f"one `score` call at {summary['fits']} targets, median ms (embedding included)", "",
                  "| input | ms |", "|---|--:|", *(f"| {name} | {ms:.1f} |" for name, ms in pathological.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--cache", type=Path, help="keep fitted classifiers here and reuse them (fit times then lie)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # one request at a time on a shared host: what a serving replica's classifier gets
    summary = run(tuple(sorted(args.sizes)), args.cache)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
