"""GUARD's forbidden phrases: the spans of a forget answer that would give the forgotten fact away.

GUARD (Deng et al., 2025) restricts generation to avoid a forget answer's key phrases; how the paper extracts them is
not published (METHODS.md §2), so Lethe takes the spans a reader would redact: names (runs of capitalised words),
titles in quotes, numbers and dates, and rare words and word pairs — rare meaning absent from the target's retain data
and the built-in negative pool. For the few answers a prompt is most about, every content word is forbidden too
(`content_words`): there, "florist" is the secret. Aliases and their distinctive parts are always forbidden.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

_WORD = re.compile(r"[A-Za-z\u00C0-\u024F][A-Za-z\u00C0-\u024F'\u2019-]*|\d[\d,./:-]*\d|\d")
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]{3,80})[\"\u201c\u201d]")
_NAME_CONNECTORS = frozenset({"of", "the", "de", "del", "da", "al", "bin", "ibn", "van", "von", "la", "le", "du", "y"})
_EXTRA_STOPWORDS = frozenset({"yes", "no", "also", "known", "like", "notably", "however", "indeed"})
MIN_RARE_WORD = 4
MIN_NUMBER_CHARS = 3  # years and dates; "2 books" is not a secret


def stopwords() -> frozenset[str]:
    return frozenset(ENGLISH_STOP_WORDS) | _EXTRA_STOPWORDS


def words(text: str) -> list[str]:
    return [m.group(0).strip("'\u2019-") for m in _WORD.finditer(text)]


@dataclass(frozen=True)
class Background:
    """Vocabulary of ordinary text (retain data + negative pool): what is NOT secret about a target."""

    unigrams: frozenset[str]
    bigrams: frozenset[tuple[str, str]]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Background:
        unigrams: set[str] = set()
        bigrams: set[tuple[str, str]] = set()
        for text in texts:
            folded = [w.lower() for w in words(text)]
            unigrams.update(folded)
            bigrams.update(zip(folded, folded[1:]))
        return cls(frozenset(unigrams), frozenset(bigrams))

    def __or__(self, other: Background) -> Background:
        return Background(self.unigrams | other.unigrams, self.bigrams | other.bigrams)


def _is_capitalised(word: str) -> bool:
    return word[:1].isupper()


def _name_runs(text: str) -> list[tuple[str, bool]]:
    """Runs of capitalised words (connectors like "of" allowed inside), each with whether it starts a sentence."""
    runs: list[tuple[str, bool]] = []
    matches = list(_WORD.finditer(text))
    i = 0
    while i < len(matches):
        word = matches[i].group(0)
        if not _is_capitalised(word):
            i += 1
            continue
        j = i + 1
        while j < len(matches):
            nxt = matches[j].group(0)
            if _is_capitalised(nxt):
                j += 1
            elif nxt.lower() in _NAME_CONNECTORS and j + 1 < len(matches) and _is_capitalised(matches[j + 1].group(0)):
                j += 2
            else:
                break
        start, end = matches[i].start(), matches[j - 1].end()
        before = text[:start].rstrip()
        sentence_start = not before or before[-1] in ".!?:\"\u201c"
        runs.append((text[start:end].strip("'\u2019-"), sentence_start))
        i = j
    return runs


def key_phrases(answer: str, background: Background) -> list[str]:
    """The forbidden spans of one forget answer, most telling first, case-insensitively unique."""
    stop = stopwords()
    phrases: list[str] = []
    phrases.extend(m.group(1).strip() for m in _QUOTED.finditer(answer))
    for run, sentence_start in _name_runs(answer):
        run_words = [w.lower() for w in words(run)]
        if all(w in stop for w in run_words):
            continue
        if sentence_start and len(run_words) == 1 and run_words[0] in background.unigrams:
            continue  # an ordinary word that happens to open a sentence
        phrases.append(run)
    phrases.extend(w for w in words(answer) if w[0].isdigit() and len(w) >= MIN_NUMBER_CHARS)
    folded = [w.lower() for w in words(answer)]
    phrases.extend(w for w in folded
                   if len(w) >= MIN_RARE_WORD and w not in stop and not w[0].isdigit() and w not in background.unigrams)
    for left, right in zip(folded, folded[1:]):
        if (left not in stop and right not in stop and len(left) >= 3 and len(right) >= 3
                and not left[0].isdigit() and not right[0].isdigit() and (left, right) not in background.bigrams):
            phrases.append(f"{left} {right}")
    return unique_phrases(phrases)


def content_words(answer: str) -> list[str]:
    """Every non-stopword word of an answer: for the answers a prompt is most about, even ordinary words ("florist")
    are the fact, so they are forbidden too (the rarity filter of `key_phrases` is for the rest)."""
    stop = stopwords()
    return unique_phrases(w.lower() for w in words(answer)
                          if len(w) >= MIN_RARE_WORD and w.lower() not in stop and not w[0].isdigit())


def alias_phrases(aliases: Sequence[str]) -> list[str]:
    """Each alias and its distinctive parts ("Al-Kuwaiti" of "Basil Mahfouz Al-Kuwaiti")."""
    stop = stopwords()
    phrases = list(aliases)
    for alias in aliases:
        phrases.extend(part for part in words(alias) if len(part) >= MIN_RARE_WORD and part.lower() not in stop)
    return unique_phrases(phrases)


def unique_phrases(phrases: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for phrase in phrases:
        key = phrase.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(phrase.strip())
    return out


@lru_cache(maxsize=1)
def builtin_background() -> Background:
    """The negative pool's texts as ordinary vocabulary (loaded once)."""
    from classifiers.negatives import builtin_negative_pool

    return Background.from_texts(negative.text for negative in builtin_negative_pool())
