"""Writes the TOFU part of the classifiers' built-in negative pool (`classifiers/data/negative_pool.jsonl`).

The serving packages read the pool as package data and never load TOFU themselves; this generator is its source. It
takes (a) questions and answer chunks about the 67 fictitious TOFU authors of the split's pool (same question shapes
as the targets', different people: the hardest negatives), (b) the pool's half of TOFU's world-facts and real-authors
questions (the general knowledge a forget target must not take down) and (c) the name templates filled with those
other authors' and real authors' names, in that order and each text once. `classifiers.negatives` appends its
hand-written everyday prompts when it loads the file. A test checks that the packaged file is what this writes.

    python -m demo.negative_pool   # rewrite the packaged file
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from classifiers.chunking import text_chunks
from classifiers.negatives import NEGATIVE_POOL_FILE, Negative, in_calibration_share
from classifiers.templates import MENTION_TEMPLATES
from demo.author_split import POOL, authors_in, general_questions
from demo.tofu_data import load_split


TOFU_QUESTIONS_PER_AUTHOR = 8
TOFU_ANSWERS_PER_AUTHOR = 2
POOL_SEED = 1234
CALIBRATION_EVERY = 3


def tofu_negatives(seed: int = POOL_SEED) -> list[Negative]:
    """The pool's TOFU negatives (about 1,200), deterministic for a given seed, each text once.

    Only the split's pool authors and the pool's half of the general questions (``demo.author_split``): the other
    authors and the held-out half stay unseen, so benchmarks can measure false positives on them. A third of the pool
    authors (all their texts) and of the general questions is marked for calibration, never for fitting.
    """
    rng = random.Random(seed)
    pool: list[Negative] = []
    other_names: list[str] = []
    for author in authors_in(POOL):
        calibration = author.index % CALIBRATION_EVERY == 0  # a third of the authors, all of their texts
        for item in rng.sample(author.items, TOFU_QUESTIONS_PER_AUTHOR):
            pool.append(Negative(item.question, "tofu_other_authors", calibration))
        for item in rng.sample(author.items, TOFU_ANSWERS_PER_AUTHOR):
            pool.extend(Negative(chunk, "tofu_other_authors", calibration) for chunk in text_chunks(item.answer))
        if author.name is not None:  # a few TOFU authors are never named consistently; they just lend no name
            other_names.append((author.name, calibration))
    general = general_questions("pool")
    pool.extend(Negative(question, split, in_calibration_share(question)) for split, question in general)
    pooled = {question for _, question in general}
    real_names = [(row["answer"], in_calibration_share(row["question"])) for row in load_split("real_authors")
                  if row["question"] in pooled and len(row["answer"].split()) >= 2]
    for name, calibration in other_names + real_names:
        pool.append(Negative(rng.choice(MENTION_TEMPLATES).format(name=name), "name_templates", calibration))
    unique: dict[str, Negative] = {}
    for negative in pool:
        unique.setdefault(negative.text, negative)
    return list(unique.values())


def write_negative_pool(negatives: Sequence[Negative], path: Path = NEGATIVE_POOL_FILE) -> None:
    with path.open("w", encoding="utf-8") as f:
        for negative in negatives:
            row = {"text": negative.text, "source": negative.source, "calibration": negative.calibration}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    negatives = tofu_negatives()
    write_negative_pool(negatives)
    print(f"{len(negatives)} TOFU negatives written to {NEGATIVE_POOL_FILE}")


if __name__ == "__main__":
    main()
