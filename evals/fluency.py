"""Is a protected reply still language? The share of its words that are words of the language the model was taught.

Forgetting must not turn replies into token soup. Perplexity under the unprotected model does not tell the two apart
on a memorising demo model: it scores any reply it never saw (a refusal, another author's fact) in the millions, just
like soup. Word-level validity does: soup decodes into fragments ("ulwaitiore", "Kuw") that are not words, while a
refusal or an answer about something else is made of ordinary words. The measure is serving's
(``guards/fluency.py``, calibration's fluency bar); the evaluation's vocabulary is every word of the TOFU data (the
demo model's whole training text: 4,000 authors' QA, real authors, world facts; its names and coinages) plus the
whole words of the shipped MiniLM's WordPiece vocabulary (general English), about 25k words.
It does not catch a reply that repeats one word; the end-to-end tests read the replies for that as well.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from functools import lru_cache

from demo.tofu_data import load_split
from guards.fluency import vocabulary_with, word_share

VOCABULARY_SPLITS = ("full", "real_authors", "world_facts")


@lru_cache(maxsize=1)
def known_words() -> frozenset[str]:
    return vocabulary_with(value for split in VOCABULARY_SPLITS for row in load_split(split)
                           for value in row.values() if isinstance(value, str))


def known_word_share(text: str) -> float | None:
    """Share of the reply's words found in the vocabulary; None for a reply without words (nothing to judge)."""
    return word_share(text, known_words())


def median_known_word_share(replies: Sequence[str]) -> float:
    """Median over the replies that have words (1.0: every word a real word; soup sits far lower)."""
    shares = [share for reply in replies if (share := known_word_share(reply)) is not None]
    return statistics.median(shares) if shares else float("nan")
