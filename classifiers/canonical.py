"""The form in which the detectors read text, so that spelling tricks that leave a name readable to the model do not
hide it from the gate. Prompts and aliases go through the same functions; the prompt sent to the model is untouched.

- Compatibility forms are unified (NFKC/NFKD): fullwidth "Ｂａｓｉｌ", ligatures, superscripts.
- Format characters (Unicode category Cf) are removed: zero-width space/joiner/non-joiner, word joiner, soft hyphen,
  byte-order mark, bidirectional controls, tag characters; so are the Hangul fillers, invisible letters. Invisible in
  a rendered prompt, they split a name into pieces no detector recognises ("Ba\u200bsil").
- Look-alike characters become the ASCII letter or digit they imitate, from the confusables data of Unicode TS #39
  (the `confusable-homoglyphs` package ships it): Cyrillic "а е о р с у х і ј", Greek "ο ν ρ", Armenian "օ" ...

`canonical_text` is what the embedding heads read (case and diacritics kept: MiniLM lowercases and strips accents
itself). The alias index reads `alias_form` (diacritics dropped too, with each character's offset in the original
text, since an alias span must point at the original characters) and compares words by `fold` (casefolded), reading
digits typed for letters through `leet_readings`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

# Digits and symbols typed for the letters they resemble, read so only inside words that also have letters ("B4sil",
# "Kuw41ti"), never in numbers ("1956", "08/09/1956"). "1" is read as "l" and, as a second reading, "i".
_LEET = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_ONE_AS_I = str.maketrans({"1": "i"})
_HAS_LEET = re.compile(r"[013457@$]")


@lru_cache(maxsize=1)
def lookalikes() -> dict[str, str]:
    """{non-ASCII character: the ASCII letter or digit it imitates}, built once from the TS #39 confusables data.

    The package's map is bidirectional (a character's prototype, and a prototype's look-alikes), so a character's
    candidates are its ASCII prototype and the ASCII letters sharing that prototype ("І" -> "l", which "I" also
    imitates). The pick is deterministic: a letter of the character's own case, then a lowercase letter, an uppercase
    one, a digit.
    """
    from confusable_homoglyphs.utils import load

    data: dict[str, list[dict[str, str]]] = load("confusables.json")

    def ascii_alnum(char: str) -> list[str]:
        return [e["c"] for e in data.get(char, ()) if len(e["c"]) == 1 and e["c"].isascii() and e["c"].isalnum()]

    table: dict[str, str] = {}
    for char in data:
        if len(char) != 1 or char.isascii():
            continue
        candidates = set(ascii_alnum(char))
        for prototype in list(candidates):
            candidates.update(ascii_alnum(prototype))
        if candidates:
            table[char] = min(candidates, key=lambda c: (
                not (c.isalpha() and c.isupper() == char.isupper()), not c.islower(), not c.isupper(), c))
    return table


# Default-ignorable characters that are letters (category Lo), not format characters: they render as nothing.
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")


def _is_dropped(char: str, *, marks: bool) -> bool:
    """Whether `char` is invisible (a format character or an invisible letter), or (with `marks`) a mark: an accent,
    a variation selector, a combining grapheme joiner."""
    category = unicodedata.category(char)
    return category == "Cf" or char in _INVISIBLE_LETTERS or (marks and category[0] == "M")


@lru_cache(maxsize=65536)
def _canonical_char(char: str, *, keep_marks: bool) -> str:
    """One original character as the detectors read it: NFKD, format characters (and marks unless kept) dropped,
    look-alikes mapped, a decimal digit of another script as its ASCII digit ("١" -> "1"); case kept."""
    table = lookalikes()
    out = []
    for c in unicodedata.normalize("NFKD", char):
        if _is_dropped(c, marks=not keep_marks):
            continue
        if c in table:
            c = table[c]
        elif not c.isascii() and unicodedata.category(c) == "Nd":
            c = str(unicodedata.digit(c))
        out.append(c)
    return "".join(out)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def canonical_text(text: str) -> str:
    """What the embedding heads read: format characters removed, look-alikes mapped, NFKC; case and accents kept."""
    if text.isascii():
        return text
    mapped = _NON_ASCII.sub(lambda m: _canonical_char(m.group(0), keep_marks=True), text)
    return unicodedata.normalize("NFKC", mapped)


@dataclass(frozen=True)
class AliasForm:
    """A text as the alias index reads it, with each of its characters' offset in the original text."""

    text: str  # NFKD, invisible characters and marks removed, look-alikes mapped; case kept
    origin: Sequence[int]  # origin[i]: index in the original text of the character text[i] came from; then its length

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original text's [start, end) that `text[start:end]` (not empty) came from, with the marks and format
        characters removed right after it ("a\u0301" ends after the accent)."""
        return self.origin[start], max(self.origin[end], self.origin[end - 1] + 1)


def alias_form(text: str) -> AliasForm:
    """`text` in the alias index's form; ASCII text is its own form (the common case costs nothing)."""
    if text.isascii():
        return AliasForm(text, range(len(text) + 1))
    pieces: list[str] = []
    origin: list[int] = []
    done = 0
    for match in _NON_ASCII.finditer(text):
        i = match.start()
        pieces.append(text[done:i])
        origin.extend(range(done, i))
        mapped = _canonical_char(text[i], keep_marks=False)
        pieces.append(mapped)
        origin.extend([i] * len(mapped))
        done = i + 1
    pieces.append(text[done:])
    origin.extend(range(done, len(text) + 1))
    return AliasForm("".join(pieces), origin)


def fold(text: str) -> str:
    """The letters and digits of `text`, insensitive to case, diacritics, format characters and look-alikes:
    "Al-Kuwaití", "AL KUWAITI" and "Аl-Кuwаiti" (Cyrillic) all fold to "alkuwaiti"."""
    if text.isascii():
        return text.lower() if text.isalnum() else "".join(c for c in text.lower() if c.isalnum())
    table = lookalikes()
    folded = alias_form(text).text.casefold()
    return "".join(table.get(c, c).lower() for c in folded if c.isalnum())


def leet_readings(word: str) -> tuple[str, ...]:
    """A word read with digits (or "@", "$") typed for letters, only if it mixes them with letters: "B4sil" ->
    ("Basil",), "Kuw41ti" -> ("Kuwalti", "Kuwaiti"), "1956" -> ("1956",) (fold the readings to compare them)."""
    if not _HAS_LEET.search(word) or not any(c.isalpha() for c in word):
        return (word,)
    readings = [word.translate(_LEET)]
    if "1" in word:
        readings.append(word.translate(_LEET_ONE_AS_I).translate(_LEET))
    return tuple(dict.fromkeys(readings))
