"""Prompt-classifier quality on TOFU forget01: recall on held-out paraphrases and false positives on unseen prompts.

Targets: the two forget01 authors, alias = name, retain = demo authors 0-8. Two registrations are compared:
`questions` (forget items are the 20 questions only) and `qa` (question + answer, as TOFU's forget set and SPEC §4's
example have them). Nothing fitted on is scored: positives are TOFU's paraphrased questions; negatives are demo
authors 9-17 (unseen), the retain authors' paraphrased questions, and the 30 % of the built-in pool held out from
fitting (by text hash). A prompt counts as a false positive when it hits any target (the bank's view).

    python bench/classifier_quality.py            # writes bench/results/classifier_quality.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from classifiers import ClassifierBank, Embedder, ForgetItem, TargetSpec, fit_prompt_classifier
from classifiers.negatives import builtin_negative_pool, split_by_hash
from demo.tofu_data import authors_of, demo_authors

RESULTS = Path(__file__).parent / "results" / "classifier_quality.json"


def specs(with_answers: bool) -> dict[str, TargetSpec]:
    retain = [ForgetItem(i.question, i.answer) for a in demo_authors()[:9] for i in a.items]
    return {
        f"tofu-{a.index}": TargetSpec(
            id=f"tofu-{a.index}",
            name=a.name,
            aliases=[a.name],
            forget=[ForgetItem(i.question, i.answer if with_answers else None) for i in a.items],
            retain=retain,
        )
        for a in authors_of("forget01")
    }


def evaluate(bank: ClassifierBank, embedder: Embedder, heldout_pool) -> dict[str, dict[str, float]]:
    def hit_sets(prompts: list[str]) -> list[set[str]]:
        embedder.encode(prompts)  # one batch; the per-request calls below are then served from the cache
        return [{h.target_id for h in bank.score([("user", p)]).hits} for p in prompts]

    paraphrase_hits = [
        f"tofu-{a.index}" in hits
        for a in authors_of("forget01")
        for hits in hit_sets([i.paraphrased_question for i in a.items])
    ]
    negative_sets = {
        "unseen_demo_authors": [i.question for a in demo_authors()[9:18] for i in a.items],
        "retain_authors_paraphrased": [i.paraphrased_question for a in demo_authors()[:9] for i in a.items],
    }
    for source in sorted({n.source for n in heldout_pool}):
        negative_sets[f"heldout_{source}"] = [n.text for n in heldout_pool if n.source == source]
    fpr = {name: float(np.mean([bool(h) for h in hit_sets(prompts)])) for name, prompts in negative_sets.items()}
    return {
        "paraphrase_recall": {"value": float(np.mean(paraphrase_hits)), "n": len(paraphrase_hits)},
        "false_positive_rate": {name: {"value": fpr[name], "n": len(p)} for name, p in negative_sets.items()},
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    embedder = Embedder()
    fit_pool, heldout_pool = split_by_hash(builtin_negative_pool(), heldout_fraction=0.3)
    report = {}
    for name, with_answers in (("questions", False), ("qa", True)):
        started = time.perf_counter()
        artifacts = {
            tid: fit_prompt_classifier(spec, embedder, negative_pool=fit_pool)
            for tid, spec in specs(with_answers).items()
        }
        fit_seconds = time.perf_counter() - started
        bank = ClassifierBank.from_artifacts(artifacts, embedder)
        report[name] = {
            "fit_seconds_both_targets": round(fit_seconds, 1),
            "artifacts": {
                tid: {
                    "threshold": a.threshold,
                    "heldout_recall_oof": a.heldout_recall,
                    "false_positive_rate_oof": a.false_positive_rate,
                    "n_pos": a.n_pos,
                    "n_neg": a.n_neg,
                }
                for tid, a in artifacts.items()
            },
            **evaluate(bank, embedder, heldout_pool),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    for name, r in report.items():
        print(f"\n== forget items: {name} ==")
        for tid, a in r["artifacts"].items():
            print(f"  {tid}: threshold {a['threshold']:.4f}  OOF recall {a['heldout_recall_oof']:.3f}  "
                  f"OOF FPR {a['false_positive_rate_oof']:.4f}  ({a['n_pos']}+/{a['n_neg']}-)")
        pr = r["paraphrase_recall"]
        print(f"  paraphrase recall: {pr['value']:.3f} (n={pr['n']})")
        for source, v in r["false_positive_rate"].items():
            print(f"  FPR {source:32s} {v['value']:.3f} (n={v['n']})")
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
