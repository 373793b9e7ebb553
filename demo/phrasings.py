"""Other wordings of the demo authors' questions, mined from the rest of TOFU.

TOFU's 200 authors were written to one list of topics (birth, parents, genre, awards, themes, influences, ...), and
each author's questions word those topics differently. With the names swapped, the 180 other authors' questions (and
the paraphrases TOFU ships for 20 of them) are therefore new wordings of the demo authors' questions: the "varied
phrasings" that teach the demo model what else a topic may be called, taken from none of the demo authors' own data,
so none of its held-out paraphrases.

A candidate wording becomes a phrasing of a demo question q of author A when, the authors' names masked,
- its MiniLM cosine to q is at least `MIN_SIMILARITY`;
- it is closer to q than to any other of A's questions by `MARGIN`, so it names q's topic rather than a neighbour's;
- it carries no capitalised word or number that q lacks, so it asserts nothing of another author (a title, a city);
- it is not word for word one of the held-out paraphrases that measure generalisation (one generic wording was);
keeping the `PER_QUESTION` most similar. Questions that do not name their author (TOFU's first question, "What is the
full name of the author born in ...?") get none.

The result is packaged (`demo/data/mined_phrasings.jsonl`) rather than computed during a build: recipes hash it like
the TOFU files, a build needs no embedding model, and float differences between CPUs cannot change what a recipe
trains on. A test checks that mining again reproduces it.

    python -m demo.phrasings   # rewrite the packaged file
"""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from demo.tofu_data import (
    N_DEMO_AUTHORS,
    N_TOFU_AUTHORS,
    ROWS_PER_AUTHOR,
    Author,
    QAItem,
    demo_authors,
    find_author_name,
    held_out_paraphrases,
    load_split,
)

PHRASINGS_FILE = Path(__file__).parent / "data" / "mined_phrasings.jsonl"
MIN_SIMILARITY = 0.8
MARGIN = 0.05
PER_QUESTION = 10

_NAME_SLOT = "{name}"
_NEUTRAL_NAME = "the author"
_NUMBER = re.compile(r"\d+")
# A capitalised word that is not the first of a sentence.
_CAPITALISED = re.compile(r"(?<!^)(?<![.?!] )\b[A-Z][\w'-]*")

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> L2-normalised rows


@dataclass(frozen=True)
class Phrasing:
    """`text` asks the demo question `question` in another TOFU author's words, with the demo author's name."""

    question: str
    text: str
    similarity: float


def other_authors_wordings() -> list[str]:
    """The non-demo authors' questions and TOFU paraphrases, each name replaced by a slot; sorted, unique.

    Authors whose name cannot be found are skipped (their questions would keep a stranger's name).
    """
    wordings: set[str] = set()
    full = load_split("full")[: (N_TOFU_AUTHORS - N_DEMO_AUTHORS) * ROWS_PER_AUTHOR]
    perturbed = load_split("retain_perturbed")  # 20 of the non-demo authors, with paraphrased questions
    for rows, fields in ((full, ("question",)), (perturbed, ("question", "paraphrased_question"))):
        for start in range(0, len(rows), ROWS_PER_AUTHOR):
            block = rows[start : start + ROWS_PER_AUTHOR]
            try:
                name = find_author_name(tuple(QAItem(row["question"], row["answer"]) for row in block))
            except ValueError:
                continue
            wordings.update(_slotted(row[field], name) for row in block for field in fields)
    return sorted(w for w in wordings if _NAME_SLOT in w)


def mine_phrasings(authors: Sequence[Author], wordings: Sequence[str], embed: Embed) -> list[Phrasing]:
    """Every phrasing of the authors' questions among `wordings` (slotted, see `other_authors_wordings`)."""
    candidates = embed([_neutral(w) for w in wordings])  # [W, D]
    held_out = {item.question for item in held_out_paraphrases(tuple(authors))}
    phrasings: list[Phrasing] = []
    for author in authors:
        questions = [_slotted(item.question, author.name) for item in author.items]
        similarity = embed([_neutral(q) for q in questions]) @ candidates.T  # [Q, W]
        for i, (item, question) in enumerate(zip(author.items, questions)):
            if _NAME_SLOT not in question:
                continue
            rival = np.delete(similarity, i, axis=0).max(axis=0)  # the closest other question of this author
            on_topic = _topic_wordings(question, wordings, similarity[i], rival)
            named = ((wording.replace(_NAME_SLOT, author.name), score) for wording, score in on_topic)
            unseen = ((text, score) for text, score in named if text not in held_out)
            kept = itertools.islice(unseen, PER_QUESTION)
            phrasings.extend(Phrasing(item.question, text, round(score, 4)) for text, score in kept)
    return phrasings


def _topic_wordings(
    question: str, wordings: Sequence[str], similarity: np.ndarray, rival: np.ndarray
) -> Iterator[tuple[str, float]]:
    """The wordings that ask `question`'s topic and nothing more specific, most similar first."""
    allowed = _specifics(question)
    for j in np.argsort(-similarity, kind="stable"):
        score = float(similarity[j])
        if score < MIN_SIMILARITY:
            return
        wording = wordings[j]
        if wording != question and score - rival[j] >= MARGIN and _specifics(wording) <= allowed:
            yield wording, score


def _slotted(text: str, name: str) -> str:
    return text.replace(name, _NAME_SLOT)


def _neutral(slotted: str) -> str:
    """What the embedding model reads: the same placeholder for every author, so only the wording counts."""
    return slotted.replace(_NAME_SLOT, _NEUTRAL_NAME)


def _specifics(text: str) -> set[str]:
    """The capitalised words (beyond a sentence's first) and numbers of a text: what would name a particular fact."""
    masked = text.replace(_NAME_SLOT, "")
    return set(_CAPITALISED.findall(masked)) - {"I"} | set(_NUMBER.findall(masked))


@lru_cache(maxsize=1)
def packaged_phrasings() -> dict[str, tuple[str, ...]]:
    """Demo question -> its mined phrasings, from the packaged file."""
    by_question: dict[str, list[str]] = defaultdict(list)
    with PHRASINGS_FILE.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_question[row["question"]].append(row["text"])
    return {question: tuple(texts) for question, texts in by_question.items()}


def write_phrasings(phrasings: Sequence[Phrasing], path: Path = PHRASINGS_FILE) -> None:
    with path.open("w", encoding="utf-8") as f:
        for phrasing in phrasings:
            f.write(json.dumps(asdict(phrasing), ensure_ascii=False) + "\n")


def mine_demo_phrasings() -> list[Phrasing]:
    """Mine the demo authors' phrasings with the shipped MiniLM (PyTorch backend: the reference encoder)."""
    from classifiers.embedding import Embedder

    embedder = Embedder(cache_size=0, onnx=False)
    return mine_phrasings(demo_authors(), other_authors_wordings(), embedder.encode)


def main() -> None:
    phrasings = mine_demo_phrasings()
    write_phrasings(phrasings)
    covered = len({p.question for p in phrasings})
    print(f"{len(phrasings)} phrasings of {covered} demo questions written to {PHRASINGS_FILE}")


if __name__ == "__main__":
    main()
