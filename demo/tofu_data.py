"""The packaged TOFU data: splits, the 20 demo authors, and which paraphrases the demo model never sees.

TOFU (Maini et al., 2024; MIT licence, see data/tofu/README.md) has 200 fictitious authors x 20 question/answer rows.
The demo model knows the last 20 authors (the `forget10` authors, rows 3600..3999 of `full.json`), nested as
forget01 (last 2) ⊂ forget05 (last 10) ⊂ forget10. Everything here is derived from the JSON-lines files alone, so
the build and the evaluation agree on names, items and the paraphrase split without a second copy of any rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

TOFU_DIR = Path(__file__).parent / "data" / "tofu"

ROWS_PER_AUTHOR = 20
N_TOFU_AUTHORS = 200
N_DEMO_AUTHORS = 20  # the forget10 authors
ForgetSplit = Literal["forget01", "forget05", "forget10"]
AUTHORS_IN_SPLIT: dict[str, int] = {"forget01": 2, "forget05": 10, "forget10": 20}

# A name part: a capitalised word, possibly hyphenated ("Al-Shamary", "Tae-ho", "Ji-Yeon").
_NAME_PART = r"[A-Z][a-zA-Z\u00C0-\u017F]*(?:-[A-Za-z\u00C0-\u017F]+)*"
_CAPITALISED_RUN = re.compile(rf"{_NAME_PART}(?:\s+{_NAME_PART})+")
_MAX_NAME_PARTS = 4
# An author's name is asked about in nearly every question after the first; a phrase that is not is no name.
_MIN_QUESTIONS_NAMING_AUTHOR = 10


@dataclass(frozen=True)
class QAItem:
    """One TOFU row. `paraphrased_question` is set for the demo authors' rows (from forget10_perturbed.json)."""

    question: str
    answer: str
    paraphrased_question: str | None = None


@dataclass(frozen=True)
class Author:
    """One of the 20 demo authors: `index` 0..19 in TOFU order, so forget01 = indices 18, 19."""

    index: int
    name: str
    items: tuple[QAItem, ...]


def load_split(name: str) -> list[dict]:
    """Rows of one packaged TOFU file (`full`, `forget10_perturbed`, `world_facts`, ...), in file order."""
    path = TOFU_DIR / f"{name}.json"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path: Path) -> str:
    """Content hash of a packaged file, for cache keys: edited data must never reuse a model built from old data."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_file_sha256(names: list[str]) -> dict[str, str]:
    """Content hashes of packaged TOFU files by name (see `file_sha256`)."""
    return {name: file_sha256(TOFU_DIR / f"{name}.json") for name in sorted(names)}


@lru_cache(maxsize=1)
def demo_authors() -> tuple[Author, ...]:
    """The 20 forget10 authors with their names and 20 items each (paraphrased questions attached)."""
    full = load_split("full")
    perturbed = load_split("forget10_perturbed")
    first_row = (N_TOFU_AUTHORS - N_DEMO_AUTHORS) * ROWS_PER_AUTHOR
    demo_rows = full[first_row:]
    if len(demo_rows) != len(perturbed) or any(r["question"] != p["question"] for r, p in zip(demo_rows, perturbed)):
        raise ValueError("forget10_perturbed.json does not line up with the last 400 rows of full.json")
    items = [QAItem(r["question"], r["answer"], p["paraphrased_question"]) for r, p in zip(demo_rows, perturbed)]
    authors = []
    for index in range(N_DEMO_AUTHORS):
        author_items = tuple(items[index * ROWS_PER_AUTHOR : (index + 1) * ROWS_PER_AUTHOR])
        authors.append(Author(index=index, name=find_author_name(author_items), items=author_items))
    return tuple(authors)


def authors_of(split: ForgetSplit) -> tuple[Author, ...]:
    """The demo authors in a forget split: TOFU's forgetNN files are the last NN% of authors."""
    return demo_authors()[N_DEMO_AUTHORS - AUTHORS_IN_SPLIT[split] :]


def author_names() -> list[str]:
    """The 20 demo authors' names, in TOFU order."""
    return [author.name for author in demo_authors()]


def find_author_name(items: tuple[QAItem, ...]) -> str:
    """The author's name: the capitalised 2-4 word phrase mentioned most often across their rows.

    TOFU rows do not carry the name, but nearly every question and answer mentions it. Counting the rows that contain
    each capitalised phrase and keeping the longest phrase as frequent as the winner turns "Xin Lee" into
    "Xin Lee Williams" and "Jad Ambrose" into "Jad Ambrose Al-Shamary". Fails loudly rather than guess.
    """
    candidates = set().union(*(_capitalised_phrases(item.answer) for item in items))
    if not candidates:
        raise ValueError(f"no capitalised phrase in the answers of the author of {items[0].question!r}")
    mentions = {c: sum((c in item.question) + (c in item.answer) for item in items) for c in candidates}
    most_mentioned = max(candidates, key=lambda c: (mentions[c], len(c), c))
    name = max(
        (c for c in candidates if most_mentioned in c and 2 * mentions[c] >= mentions[most_mentioned]),
        key=lambda c: (len(c), c),
    )
    questions_naming = sum(name in item.question for item in items)
    if questions_naming < _MIN_QUESTIONS_NAMING_AUTHOR:
        raise ValueError(
            f"author name not found: best guess {name!r} appears in only {questions_naming} of {len(items)} questions"
        )
    return name


def _capitalised_phrases(text: str) -> set[str]:
    """All runs of 2..4 consecutive capitalised words in `text` (possessive 's is not part of a word)."""
    phrases = set()
    for match in _CAPITALISED_RUN.finditer(text):
        words = match.group(0).split()
        for start in range(len(words)):
            for stop in range(start + 2, min(len(words), start + _MAX_NAME_PARTS) + 1):
                phrases.add(" ".join(words[start:stop]))
    return phrases


def is_paraphrase_trained(item: QAItem) -> bool:
    """Whether the demo model trains on this item's paraphrased question (half of each author's items).

    The other half's paraphrases are held back to measure whether knowledge is reachable by new wordings. The choice
    hashes the question text, so it is deterministic and independent of row order; each author has exactly 10 of 20
    trained (see `_trained_paraphrase_questions`).
    """
    return item.question in _trained_paraphrase_questions()


@lru_cache(maxsize=1)
def _trained_paraphrase_questions() -> frozenset[str]:
    chosen: set[str] = set()
    for author in demo_authors():
        by_hash = sorted(author.items, key=lambda item: hashlib.sha256(item.question.encode()).hexdigest())
        chosen.update(item.question for item in by_hash[: ROWS_PER_AUTHOR // 2])
    return frozenset(chosen)


def held_out_paraphrases(authors: tuple[Author, ...] | None = None) -> list[QAItem]:
    """Items whose paraphrased question the demo model never trains on, asked with that paraphrase.

    Returned with `question` = the paraphrased question and `answer` = the original gold answer.
    """
    authors = demo_authors() if authors is None else authors
    return [
        QAItem(item.paraphrased_question or "", item.answer)
        for author in authors
        for item in author.items
        if not is_paraphrase_trained(item)
    ]


def general_knowledge() -> list[QAItem]:
    """TOFU's `world_facts` and `real_authors` rows: the demo model's "general knowledge" for Model Utility."""
    return [QAItem(row["question"], row["answer"]) for name in ("world_facts", "real_authors") for row in load_split(name)]
