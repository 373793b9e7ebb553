"""Writes the TOFU part of the classifiers' built-in negative pool (`classifiers/data/negative_pool.jsonl`).

The serving packages read the pool as package data and never load TOFU themselves; this generator is its source. It
takes (a) questions and answer chunks about the 180 fictitious TOFU authors the demo model does not know (same question
shapes as the targets', different people: the hardest negatives), (b) TOFU's world-facts and real-authors questions
(the general knowledge a forget target must not take down) and (c) the name templates filled with those other
authors' and real authors' names, in that order and each text once. `classifiers.negatives` appends its hand-written
everyday prompts when it loads the file. A test checks that the packaged file is what this writes.

    python -m demo.negative_pool   # rewrite the packaged file
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from classifiers.chunking import text_chunks
from classifiers.negatives import NEGATIVE_POOL_FILE, Negative
from classifiers.templates import MENTION_TEMPLATES
from demo.tofu_data import N_DEMO_AUTHORS, N_TOFU_AUTHORS, ROWS_PER_AUTHOR, QAItem, find_author_name, load_split

logger = logging.getLogger(__name__)

TOFU_QUESTIONS_PER_AUTHOR = 3
TOFU_ANSWERS_PER_AUTHOR = 1
POOL_SEED = 1234


def tofu_negatives(seed: int = POOL_SEED) -> list[Negative]:
    """The pool's TOFU negatives (about 1,200), deterministic for a given seed, each text once."""
    rng = random.Random(seed)
    full = load_split("full")
    pool: list[Negative] = []
    other_names: list[str] = []
    for author in range(N_TOFU_AUTHORS - N_DEMO_AUTHORS):
        rows = full[author * ROWS_PER_AUTHOR : (author + 1) * ROWS_PER_AUTHOR]
        for row in rng.sample(rows, TOFU_QUESTIONS_PER_AUTHOR):
            pool.append(Negative(row["question"], "tofu_other_authors"))
        for row in rng.sample(rows, TOFU_ANSWERS_PER_AUTHOR):
            pool.extend(Negative(chunk, "tofu_other_authors") for chunk in text_chunks(row["answer"]))
        try:
            other_names.append(find_author_name(tuple(QAItem(r["question"], r["answer"]) for r in rows)))
        except ValueError as err:  # a few TOFU authors are never named consistently; they just lend no name
            logger.debug("no name for TOFU author %d: %s", author, err)
    for split in ("world_facts", "real_authors"):
        pool.extend(Negative(row["question"], split) for row in load_split(split))
    real_names = [row["answer"] for row in load_split("real_authors") if len(row["answer"].split()) >= 2]
    for name in other_names + real_names:
        pool.append(Negative(rng.choice(MENTION_TEMPLATES).format(name=name), "name_templates"))
    unique: dict[str, Negative] = {}
    for negative in pool:
        unique.setdefault(negative.text, negative)
    return list(unique.values())


def write_negative_pool(negatives: Sequence[Negative], path: Path = NEGATIVE_POOL_FILE) -> None:
    with path.open("w", encoding="utf-8") as f:
        for negative in negatives:
            f.write(json.dumps({"text": negative.text, "source": negative.source}, ensure_ascii=False) + "\n")


def main() -> None:
    negatives = tofu_negatives()
    write_negative_pool(negatives)
    print(f"{len(negatives)} TOFU negatives written to {NEGATIVE_POOL_FILE}")


if __name__ == "__main__":
    main()
