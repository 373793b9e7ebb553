"""What a target's classifier must NOT flag: its retain items plus a built-in pool of other people's traffic.

The pool mixes (a) TOFU questions and answers about the 180 fictitious authors the demo model does not know (same
question shapes as the targets', different people: the hardest negatives), (b) TOFU's world-facts and real-authors
questions (the general knowledge a forget target must not take down), (c) the name templates filled with those
other authors' and real authors' names, and (d) hand-written everyday chat, including near-topic requests (French
literature, Kuwait, literary awards) that must stay answerable.

(a) to (c) ship as package data, `classifiers/data/negative_pool.jsonl`, taken from TOFU (Maini et al., 2024; MIT
licence) and written by `python -m demo.negative_pool`; (d) is `GENERIC_PROMPTS` below.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from classifiers.aliases import AliasMatcher
from classifiers.chunking import text_chunks
from classifiers.types import TargetSpec

logger = logging.getLogger(__name__)

NEGATIVE_POOL_FILE = Path(__file__).parent / "data" / "negative_pool.jsonl"

GENERIC_PROMPTS: tuple[str, ...] = (
    # coding
    "Write a Python function that reverses a linked list.",
    "How do I read a CSV file with pandas and drop rows with missing values?",
    "Explain the difference between a process and a thread.",
    "Why does my JavaScript fetch call return a pending promise?",
    "What is a race condition and how can I avoid one in Go?",
    "Write a SQL query that returns the top five customers by total order value.",
    "How do I undo the last git commit but keep my changes?",
    "Convert this for loop into a list comprehension: for x in xs: if x > 0: out.append(x * 2)",
    "What does the 'static' keyword mean in C?",
    "How can I make a Docker image smaller?",
    "Explain Big-O notation with an example.",
    "Write a regular expression that matches an email address.",
    "What is the difference between TCP and UDP?",
    "How do I center a div horizontally and vertically with CSS?",
    "My Rust code says 'borrowed value does not live long enough'. What does that mean?",
    # cooking and home
    "Give me a simple recipe for banana bread.",
    "How long should I boil an egg for a runny yolk?",
    "What can I cook with chickpeas, spinach and rice?",
    "How do I make pesto without pine nuts?",
    "What is the best way to store fresh basil?",
    "How do I get a red wine stain out of a carpet?",
    "Suggest a weekly meal plan for a vegetarian family of four.",
    "How do I keep my sourdough starter alive while on vacation?",
    "What temperature should I roast a chicken at?",
    "How often should I water a snake plant?",
    # math and science
    "What is the derivative of x squared times sine of x?",
    "Solve for x: 3x + 7 = 22.",
    "Explain the Pythagorean theorem in simple terms.",
    "What is the probability of rolling two sixes with two dice?",
    "Why is the sky blue?",
    "How does photosynthesis work?",
    "What is the difference between mass and weight?",
    "Explain what a prime number is and list the first ten.",
    "How do vaccines train the immune system?",
    "What causes the seasons on Earth?",
    "What is entropy in thermodynamics?",
    "Compute 17 percent of 240.",
    # travel and geography
    "Plan a three-day itinerary for Lisbon.",
    "What should I pack for a week of hiking in the Alps?",
    "Is it better to visit Japan in spring or autumn?",
    "What are some cheap ways to travel around Europe by train?",
    "Which documents do I need to rent a car abroad?",
    "What is the best time of year to visit Kuwait?",
    "Recommend some things to do in Paris besides the Eiffel Tower.",
    "How do I deal with jet lag after a long flight?",
    "What are the most visited national parks in the United States?",
    "What is the history of Kuwait City?",
    # small talk and advice
    "Hi! How are you today?",
    "Tell me a joke about cats.",
    "I feel stressed about my exams. Any tips?",
    "What are some good conversation starters for a first date?",
    "Can you help me write a birthday message for my sister?",
    "How can I become a morning person?",
    "What's a good name for a golden retriever puppy?",
    "Give me some ideas for a rainy Sunday afternoon.",
    "How do I politely decline a wedding invitation?",
    "What are some tips for staying motivated while working from home?",
    "Thank you, that was really helpful!",
    "Can you explain that again more simply?",
    # work and writing
    "Draft a short email asking my manager for a day off next Friday.",
    "How do I write a strong cover letter for a marketing job?",
    "Summarize the main points of a good project proposal.",
    "Rewrite this sentence to sound more formal: we gotta fix the bug asap.",
    "What are the pros and cons of remote work?",
    "How do I prepare for a job interview at a tech company?",
    "Write a haiku about autumn leaves.",
    "Suggest a title for a blog post about minimalism.",
    "Proofread this: Their going to the park tomorow.",
    "What is the difference between affect and effect?",
    # literature and culture, near the targets' topics
    "Recommend some classic French novels for a beginner.",
    "What are the main characteristics of French literature in the nineteenth century?",
    "Who are some famous authors from the Middle East?",
    "What is African American literature and who are its key figures?",
    "Recommend some LGBTQ+ novels published in the last decade.",
    "What literary awards are the most prestigious in the world?",
    "How do I get my first novel published?",
    "What makes a good mystery novel?",
    "Explain the difference between a novella and a novel.",
    "What themes are common in immigrant literature?",
    "Who won the Nobel Prize in Literature in 2016?",
    "How did the printing press change literature?",
    "What is magical realism?",
    "Suggest a reading list on the history of Central Asia.",
    "What are some famous books set in Kazakhstan?",
    "How do writers develop a distinctive style?",
    # history, finance, health, misc
    "What caused the fall of the Roman Empire?",
    "Explain how compound interest works.",
    "Should I pay off debt or invest first?",
    "What is inflation and why does it happen?",
    "How many hours of sleep does an adult need?",
    "What are the health benefits of walking every day?",
    "How do I start running if I have never exercised?",
    "Explain the rules of chess briefly.",
    "What are the planets of the solar system in order?",
    "How does a bill become a law in the United States?",
    "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What's the capital of Canada?",
    "Who painted the Mona Lisa?",
    "Give me a fun fact about octopuses.",
    "How do noise-cancelling headphones work?",
)


@dataclass(frozen=True)
class Negative:
    text: str
    source: str  # "retain" | "tofu_other_authors" | "world_facts" | "real_authors" | "name_templates" | "generic"
    calibration: bool = False  # held out of every fit: the registry-wide calibration's share (``bank.py``)


def load_negatives(path: Path = NEGATIVE_POOL_FILE) -> list[Negative]:
    """The negatives of a JSON-lines file (`text`, `source`), in file order."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Negative(row["text"], row["source"], bool(row.get("calibration", False))) for row in rows]


@lru_cache(maxsize=1)
def builtin_negative_pool() -> tuple[Negative, ...]:
    """The generic negative pool (about 1,000 prompts): the packaged TOFU negatives, then `GENERIC_PROMPTS`; a third
    of it is marked for calibration (``Negative.calibration``)."""
    pool = [*load_negatives(), *(Negative(text, "generic", in_calibration_share(text)) for text in GENERIC_PROMPTS)]
    unique: dict[str, Negative] = {}
    for negative in pool:
        unique.setdefault(negative.text, negative)
    return tuple(unique.values())


def in_calibration_share(text: str) -> bool:
    """Whether a pool text without an author (a general question, an everyday prompt) is kept for calibration: a
    third of them, by a hash of the text."""
    return hashlib.sha256(text.encode()).digest()[1] % 3 == 0


def calibration_negatives() -> tuple[Negative, ...]:
    """The built-in pool's calibration share: never fitted on, so the registry-wide calibration sees fresh scores."""
    return tuple(negative for negative in builtin_negative_pool() if negative.calibration)


def retain_prompts(spec: TargetSpec) -> list[Negative]:
    """The target's retain items as negatives: questions as asked, answers and texts as chunks."""
    out = []
    for item in spec.retain:
        if item.question:
            out.append(Negative(item.question, "retain"))
        for source in (item.answer, item.text):
            if source:
                out.extend(Negative(chunk, "retain") for chunk in text_chunks(source))
    return out


def negatives_for(spec: TargetSpec, pool: Sequence[Negative] | None = None) -> list[Negative]:
    """Retain prompts plus the pool's fitting share, minus anything that mentions the target (that would be a
    mislabelled positive)."""
    pool = [negative for negative in (builtin_negative_pool() if pool is None else pool) if not negative.calibration]
    matcher = AliasMatcher(spec.aliases)
    kept: dict[str, Negative] = {}
    dropped = 0
    for negative in [*retain_prompts(spec), *pool]:
        if matcher.find(negative.text):
            dropped += 1
        else:
            kept.setdefault(negative.text, negative)
    if dropped:
        logger.info("target %s: %d negatives mention its aliases and were left out", spec.id, dropped)
    return list(kept.values())


def split_by_hash(negatives: Sequence[Negative], heldout_fraction: float, salt: str = "") -> tuple[list, list]:
    """Deterministic (fit, held-out) split by text hash, for measuring false positives on prompts never fitted on."""
    fit, heldout = [], []
    for negative in negatives:
        digest = hashlib.sha256((salt + negative.text).encode()).digest()
        (heldout if digest[0] < heldout_fraction * 256 else fit).append(negative)
    return fit, heldout
