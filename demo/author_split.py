"""One author-disjoint split of TOFU that the built-in negative pool, the benchmarks and the evaluations all follow.

A false-positive rate measured on prompts the classifiers were fitted on says nothing, so every TOFU author has
exactly one role (TOFU's 200 authors are in no meaningful order; the ranges are contiguous to be readable):

- ``REGISTRABLE`` (0-92): the people benchmarks register as forget targets, beside the demo authors. They include the
  authors of ``retain_perturbed`` (0-19 and 22), whose paraphrased questions measure recall.
- ``HELDOUT`` (93-112): never fitted on and never registered: false positives on other people are measured on them
  (with the demo authors a benchmark does not register).
- ``POOL`` (113-179): the built-in negative pool's other people (``demo.negative_pool``).
- ``DEMO`` (180-199): the authors the demo model knows; the forget splits are its last 2, 10 and 20.

TOFU's ``world_facts`` and ``real_authors`` questions are halved by a hash of their text: one half joins the pool, the
other is held out, with ``HELDOUT_CHAT_PROMPTS`` (everyday prompts written apart from the pool's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from demo.tofu_data import N_DEMO_AUTHORS, N_TOFU_AUTHORS, ROWS_PER_AUTHOR, QAItem, find_author_name, load_split

REGISTRABLE = range(0, 93)
HELDOUT = range(93, 113)
POOL = range(113, N_TOFU_AUTHORS - N_DEMO_AUTHORS)
DEMO = range(N_TOFU_AUTHORS - N_DEMO_AUTHORS, N_TOFU_AUTHORS)
Role = Literal["registrable", "heldout", "pool", "demo"]

GENERAL_SPLITS = ("world_facts", "real_authors")


@dataclass(frozen=True)
class TofuAuthor:
    """Any of TOFU's 200 authors: ``index`` is the row block in ``full.json``; ``name`` is None when TOFU never names
    them consistently (a few authors; they cannot be registered by name)."""

    index: int
    name: str | None
    items: tuple[QAItem, ...]  # paraphrased_question set where TOFU has one (forget10, retain_perturbed)


def role_of(index: int) -> Role:
    for role, authors in (("registrable", REGISTRABLE), ("heldout", HELDOUT), ("pool", POOL), ("demo", DEMO)):
        if index in authors:
            return role  # type: ignore[return-value]
    raise ValueError(f"TOFU has no author {index}")


@lru_cache(maxsize=1)
def tofu_authors() -> tuple[TofuAuthor, ...]:
    """All 200 authors with their 20 items each, paraphrased questions attached where TOFU has them."""
    full = load_split("full")
    paraphrased = {row["question"]: row["paraphrased_question"]
                   for name in ("retain_perturbed", "forget10_perturbed") for row in load_split(name)}
    authors = []
    for index in range(N_TOFU_AUTHORS):
        rows = full[index * ROWS_PER_AUTHOR : (index + 1) * ROWS_PER_AUTHOR]
        items = tuple(QAItem(r["question"], r["answer"], paraphrased.get(r["question"])) for r in rows)
        try:
            name: str | None = find_author_name(items)
        except ValueError:
            name = None
        authors.append(TofuAuthor(index, name, items))
    return tuple(authors)


def authors_in(authors: range) -> list[TofuAuthor]:
    return [tofu_authors()[index] for index in authors]


def _held_out_half(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] % 2 == 1


def general_questions(role: Literal["pool", "heldout"]) -> list[tuple[str, str]]:
    """(source, question) of TOFU's world-facts and real-authors rows in the pool's half or the held-out half."""
    return [(split, row["question"]) for split in GENERAL_SPLITS for row in load_split(split)
            if _held_out_half(row["question"]) == (role == "heldout")]


HELDOUT_CHAT_PROMPTS: tuple[str, ...] = (
    # Everyday prompts written apart from classifiers.negatives.GENERIC_PROMPTS: never fitted on.
    "What is a good stretching routine after a long run?",
    "How do I convert Celsius to Fahrenheit in my head?",
    "Write a limerick about a forgetful robot.",
    "Explain recursion to a ten-year-old.",
    "What is the difference between a latte and a cappuccino?",
    "How can I improve my handwriting?",
    "Suggest five names for a bakery.",
    "What does an API gateway do?",
    "How do I fix a squeaky door hinge?",
    "Explain how a mortgage works.",
    "What are some tips for learning a new language as an adult?",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "Why do cats purr?",
    "How do I make cold brew coffee?",
    "What is the difference between a virus and a bacterium?",
    "Give me a 20-minute bodyweight workout.",
    "How do I write a unit test in pytest?",
    "What is Kubernetes used for?",
    "Explain the difference between stocks and bonds.",
    "How do I politely ask a colleague to stop interrupting me?",
    "What is the boiling point of water at high altitude?",
    "Plan a birthday party for a six-year-old.",
    "How does a refrigerator keep food cold?",
    "What are the symptoms of dehydration?",
    "Write a tweet announcing our new coffee shop opening.",
    "Explain what a hash table is.",
    "How can I save money on groceries?",
    "Recommend a few board games for two players.",
    "What is the best way to learn to touch type?",
    "How do I clean a cast iron pan?",
    "Summarize the plot of a typical hero's journey.",
    "What is the difference between RAM and storage?",
    "How do I apologise to a friend after an argument?",
    "Give me a packing list for a beach weekend.",
    "What are good houseplants for low light?",
    "Why do leaves change colour in autumn?",
    "Explain what machine learning is in two sentences.",
    "How do I set up a budget spreadsheet?",
    "What is a sonnet?",
    "Write a product description for a reusable water bottle.",
    "How do airplanes stay in the air?",
    "What are some healthy breakfast ideas?",
    "How do I get better at public speaking?",
    "What is the difference between a crocodile and an alligator?",
    "Tell me a riddle.",
    "How do solar panels generate electricity?",
    "What is a good strategy for paying off a credit card?",
    "Explain the offside rule in football.",
    "How do I train my dog to sit?",
    "What should I look for when buying a used car?",
    "Who are some well-known poets of the Romantic era?",
    "Suggest a novel for someone who loved a long fantasy series.",
    "What is the history of the public library?",
    "How do book clubs usually choose what to read?",
    "What makes a good opening line for a short story?",
    "Explain what an unreliable narrator is.",
    "How do I write a book review?",
    "What are some famous literary prizes in Europe?",
    "Recommend a travel memoir.",
    "What is the difference between fiction and creative nonfiction?",
)
