"""How far retrieval alone gets on the demo model's held-out paraphrases: the ceiling a model of that kind reaches.

Two retrieval "oracles" answer each held-out paraphrase with the gold answer of the most similar question the demo
model was trained on (TOFU's questions, the trained half of its paraphrases, the mined phrasings): by word overlap
(Jaccard), what a model without any notion of synonyms could at best do, and by MiniLM sentence embeddings, what
semantic knowledge allows. They separate "the paraphrases are unanswerable" from "this model lacks the knowledge to
answer them" (issue 2's goal is ROUGE-L recall 0.5).

    python -m evals.paraphrase_oracle
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from demo.recipes import training_corpus
from demo.corpus import Format, Source
from demo.tofu_data import held_out_paraphrases
from guards.text_metrics import rouge_l_recall

_WORD = re.compile(r"[a-z0-9'-]+")


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard_best(query: str, candidates: Sequence[str]) -> int:
    """Index of the candidate sharing the largest share of words with the query (first on ties)."""
    q = words(query)
    scores = [len(q & words(c)) / (len(q | words(c)) or 1) for c in candidates]
    return int(np.argmax(scores))


def trained_and_held_out() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, answer) pairs the full demo model is asked in training, and (held-out paraphrase, gold answer)."""
    trained = [(ex.question, ex.completion) for ex in training_corpus("full")
               if ex.format is Format.CHAT and ex.source in (Source.QA, Source.PARAPHRASE, Source.MINED) and ex.question]
    return trained, [(item.question, item.answer) for item in held_out_paraphrases()]


def main() -> None:
    from classifiers.embedding import Embedder

    trained, held_out = trained_and_held_out()
    questions = [q for q, _ in trained]
    lexical = [rouge_l_recall(trained[jaccard_best(q, questions)][1], gold) for q, gold in held_out]
    embedder = Embedder(cache_size=0)
    similarity = embedder.encode([q for q, _ in held_out]) @ embedder.encode(questions).T
    picks = similarity.argmax(axis=1)
    semantic = [rouge_l_recall(trained[j][1], gold) for j, (_, gold) in zip(picks, held_out)]
    right = np.mean([trained[j][1] == gold for j, (_, gold) in zip(picks, held_out)])
    print(f"{len(held_out)} held-out paraphrases, {len(trained)} trained questions")
    print(f"word-overlap oracle: ROUGE-L recall {np.mean(lexical):.3f}")
    print(f"MiniLM oracle:       ROUGE-L recall {np.mean(semantic):.3f} (right item {right:.0%})")


if __name__ == "__main__":
    main()
