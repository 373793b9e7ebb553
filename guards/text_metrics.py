"""ROUGE-L recall: ECO's calibration objective at serving time, TOFU's "ROUGE" column in the evaluation, and
``answer_recall``, what the erasure report's verification counts as a leak (``server/verification/leaks.py``) and
the evaluation and tests reuse (``evals.metrics``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _rouge_tokenizer() -> Any:
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(_rouge_tokenizer().tokenize(" ".join(ENGLISH_STOP_WORDS)))


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


def answer_recall(prediction: str, reference: str, question: str) -> float:
    """ROUGE-L recall of the reference's content words that the question does not already contain (ROUGE's stemmed
    tokens, scikit-learn's English stop words left out).

    Whether a reply still *gives* the answer: a protected model that echoes the question ("The full name of the
    author born in ...") reproduces a third of many gold answers by plain ROUGE-L without revealing any fact. Falls
    back to plain ROUGE-L recall when the question and stop words cover every word of the reference.
    """
    novel = answer_content_words(reference, question)
    if not novel:
        return rouge_l_recall(prediction, reference)
    return _lcs_length(novel, _rouge_tokenizer().tokenize(prediction)) / len(novel)


def answer_content_words(reference: str, question: str) -> list[str]:
    """The reference's stemmed content words that the question does not already contain, in order: what
    ``answer_recall`` counts."""
    tokenize = _rouge_tokenizer().tokenize
    given = set(tokenize(question)) | _stop_words()
    return [token for token in tokenize(reference) if token not in given]


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]
