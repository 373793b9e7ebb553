"""The word tokens alias matching reads: a text's canonical form cut into folded words, with offsets into the text.

Kept apart from the matcher (``classifiers/aliases.py``) because it is where the spelling tricks are undone before any
name is looked up: a possessive "'s" is dropped, a spaced-out run of single letters ("B a s i l", "K.u.w.a.i.t.i") is
one token, a camelCase word ("BasilMahfouz") is split at its case changes (each piece ``glued`` to the one before),
and a token mixing letters with digits, "@" or "$" ("B4sil") gets the readings of the letters they imitate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from classifiers.canonical import AliasForm, alias_form, fold, leet_readings

# A word of the canonical form: letters/digits, with "@" or "$" inside it ("B@sil", "Ba$il"), never at its edges.
_WORD = re.compile(r"[^\W_]+(?:[@$][^\W_]+)*")
# A word written in camelCase, split before each capital: "BasilMahfouz" -> "Basil" "Mahfouz", "McDonald" -> "Mc"
# "Donald"; its pieces have two letters or more, so aLtErNaTiNg case ("mAhFoUz") stays one word.
_CAMEL_CASE = re.compile(r"[A-Za-z][a-z]+(?:[A-Z][a-z]+)+")
_CAPITAL = re.compile(r"[A-Z]")
# What may separate the letters of a spaced-out word ("B a s i l", "B.a.s.i.l", "B-a-s-i-l", "B _ a _ s").
_SPACING = frozenset(" .-_*/\\|~+:")
_MAX_SPACING = 3
_MIN_SPACED_RUN = 3
_APOSTROPHES = frozenset("'\u2019")


class Token(NamedTuple):
    keys: tuple[str, ...]  # folded readings, the plain one first ("kuw41ti" -> "kuwalti", "kuwaiti")
    start: int  # offsets into the original text
    end: int
    form_start: int  # offsets into its canonical form (where the gaps between tokens are read)
    form_end: int
    glued: bool  # split off the previous token at a case change (no gap between them)


def tokenize(text: str) -> list[Token]:
    """Folded word tokens of `text`'s canonical form, with character offsets into `text`; a possessive "'s" is
    dropped, a spaced-out run of letters is one token, a camelCase word is split."""
    return form_tokens(alias_form(text))


def form_tokens(form: AliasForm) -> list[Token]:
    tokens = []
    for positions, glued in _split_case(form.text, _merge_spaced(form.text, _words(form.text))):
        word = _chars(form.text, positions)
        if word.isascii() and word.isalpha():
            keys: tuple[str, ...] = (word.lower(),)
        else:
            keys = tuple(dict.fromkeys(key for key in map(fold, leet_readings(word)) if key))
        if keys:
            start, end = form.original_span(positions[0], positions[-1] + 1)
            tokens.append(Token(keys, start, end, positions[0], positions[-1] + 1, glued))
    return tokens


def _chars(form: str, positions: Sequence[int]) -> str:
    if isinstance(positions, range):
        return form[positions.start : positions.stop]
    return "".join(form[i] for i in positions)


def _words(form: str) -> list[Sequence[int]]:
    """The words of a canonical form, as the positions of their characters; a possessive "'s" is dropped."""
    words: list[Sequence[int]] = []
    for match in _WORD.finditer(form):
        if match.group(0) in ("s", "S") and match.start() > 0 and form[match.start() - 1] in _APOSTROPHES:
            continue
        words.append(range(match.start(), match.end()))
    return words


def _merge_spaced(form: str, words: list[Sequence[int]]) -> list[Sequence[int]]:
    """The words, each run of >= 3 one-character words with the same short spacing between them ("B a s i l",
    "A-l-K-u-w-a-i-t-i") made one word of their characters."""
    merged: list[Sequence[int]] = []
    i = 0
    while i < len(words):
        end = _spaced_run_end(form, words, i) if len(words[i]) == 1 else i + 1
        if end - i >= _MIN_SPACED_RUN:
            merged.append([word[0] for word in words[i:end]])
            i = end
        else:
            merged.append(words[i])
            i += 1
    return merged


def _spaced_run_end(form: str, words: list[Sequence[int]], i: int) -> int:
    """The end of the run of one-character words starting at `i` that share the spacing after the first."""
    if len(words[i]) != 1 or i + 1 >= len(words):
        return i + 1
    gap = form[words[i][-1] + 1 : words[i + 1][0]]
    if not 0 < len(gap) <= _MAX_SPACING or not all(ch in _SPACING for ch in gap):
        return i + 1
    end = i + 1
    while end < len(words) and len(words[end]) == 1 and form[words[end - 1][-1] + 1 : words[end][0]] == gap:
        end += 1
    return end


def _split_case(form: str, words: list[Sequence[int]]) -> Iterable[tuple[Sequence[int], bool]]:
    """Each word's pieces at its camelCase changes, with whether a piece is glued to the one before it."""
    for positions in words:
        letters = _chars(form, positions)
        if not _CAMEL_CASE.fullmatch(letters):
            yield positions, False
            continue
        cuts = [0, *(m.start() for m in _CAPITAL.finditer(letters, 1)), len(letters)]
        for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
            yield positions[a:b], n > 0
