"""The TOFU evaluation's reply metric beyond plain ROUGE-L recall (which lives with ECO's calibration, the serving
code that needs it: ``guards/text_metrics.py``)."""

from __future__ import annotations

from functools import lru_cache

from rouge_score import tokenizers

from guards.text_metrics import rouge_l_recall


@lru_cache(maxsize=1)
def _rouge_tokenizer() -> tokenizers.DefaultTokenizer:
    return tokenizers.DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(_rouge_tokenizer().tokenize(" ".join(ENGLISH_STOP_WORDS)))


def answer_recall(prediction: str, reference: str, question: str) -> float:
    """ROUGE-L recall of the reference's content words that the question does not already contain (ROUGE's stemmed
    tokens, scikit-learn's English stop words left out).

    Whether a reply still *gives* the answer: a protected model that echoes the question ("The full name of the
    author born in ...") reproduces a third of many gold answers by plain ROUGE-L without revealing any fact. Falls
    back to plain ROUGE-L recall when the question and stop words cover every word of the reference.
    """
    tokenize = _rouge_tokenizer().tokenize
    given = set(tokenize(question)) | _stop_words()
    novel = [token for token in tokenize(reference) if token not in given]
    if not novel:
        return rouge_l_recall(prediction, reference)
    return _lcs_length(novel, tokenize(prediction)) / len(novel)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]
