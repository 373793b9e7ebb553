"""ROUGE-L recall: ECO's calibration objective at serving time, and TOFU's "ROUGE" column in the evaluation."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    # Importing rouge_score (NLTK) takes half a second and building the scorer loads the Porter stemmer: once per
    # process, and only in one that scores (the engine process imports the mechanisms, never this).
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of `reference` in `prediction` (TOFU's "ROUGE" column).

    Recall, not F1: TOFU asks how much of the gold answer the model reproduces, and a model that adds words after a
    correct answer still knows it.
    """
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].recall
