"""Invented entities: a target's registration with its names swapped for invented ones (issue 16).

A mechanism calibrated against the served model's behaviour on an entity it never saw needs such an entity, and
production has no second model, no retain-only twin and no other authors to offer one; what it has is the
registration. ``invent_entity`` draws a stand-in for the target: every part of every registered name (given names,
surname, initials) gets an invented counterpart, so a forget question about "Nikolai Abilov" becomes one about, say,
"Ilse Marvenko", and a surname-only mention ("Abilov's parents") becomes "Marvenko's parents". ``swap`` makes the
invented variant of a text, ``restore`` maps the invented parts of a reply back onto the real ones.

Invented names are drawn from the given names and surname syllables below, seeded by the seed and the target's names:
the same registration and seed always give the same stand-in, another seed another one. Surnames are built from
syllables, so they are not the names of real people or of TOFU's fictitious authors (the tests check the latter);
a drawn part that equals one of the target's own parts is drawn again.

``with_invented_facts`` goes one step further for a stand-in's *answers*: swapping the names alone leaves the target's
memorised facts in them (its birthplace, its titles, its dates), and a model that memorised those finds them likely
about anybody, so a stand-in answer would not be one the model never saw.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from guards.fluency import english_words

GIVEN_NAMES: tuple[str, ...] = (
    "Adela", "Alaric", "Anselm", "Aurelio", "Bettina", "Casimir", "Corin", "Dagny", "Delphine", "Emeric", "Esmond",
    "Fenna", "Florian", "Greta", "Halvard", "Ilse", "Ines", "Isolde", "Jorund", "Katrin", "Leopold", "Linnea",
    "Lorcan", "Maren", "Matthias", "Mireille", "Nerys", "Oskar", "Ottilie", "Petra", "Quentin", "Rosalind", "Rufus",
    "Sabine", "Severin", "Sigrun", "Tamsin", "Theodric", "Ulrike", "Valter", "Wilma", "Yorick", "Zdenka", "Bruna",
    "Cyprian", "Elodie", "Gisela", "Henrik", "Jovana", "Lisandro",
)
SURNAME_ONSETS: tuple[str, ...] = (
    "Bar", "Brel", "Cor", "Dal", "Dren", "Fal", "Gor", "Hal", "Kel", "Lan", "Mar", "Nor", "Pel", "Quar", "Ros",
    "Sel", "Tor", "Ul", "Var", "Wen", "Yar", "Zel",
)
SURNAME_MIDDLES: tuple[str, ...] = ("", "a", "e", "i", "o", "en", "in", "ov", "um")
SURNAME_ENDINGS: tuple[str, ...] = (
    "bek", "dell", "dran", "hoff", "ko", "mond", "nesh", "quist", "rath", "ssen", "stad", "tov", "vane", "wick",
    "zari",
)

_INITIALS = re.compile(r"^(?:[A-Z]\.)+$")  # "J." or "J.K."
_FACT_WORD = re.compile(r"(?<!\w)(?:[A-Z\u00C0-\u00DE][\w\u00C0-\u024F-]+|\d[\d,./:-]*\d)")
_SENTENCE_END = re.compile(r"(?:^|[.!?:\"\u201c])\s*$")
MIN_NUMBER_CHARS = 3  # years and dates are facts; "2 books" is not


@dataclass(frozen=True)
class InventedEntity:
    """A stand-in for one target: each part of its registered names and that part's invented counterpart."""

    parts: Mapping[str, str]  # real part ("Abilov") -> invented part ("Marvenko")
    names: tuple[str, ...]  # the target's names, each with its parts swapped (the first is its main name)

    @property
    def name(self) -> str:
        return self.names[0]

    def mentions(self, text: str) -> bool:
        """Whether ``text`` names the target (any registered name part, as registered)."""
        return _part_pattern(self.parts, ignore_case=False).search(text) is not None

    def swap(self, text: str) -> str:
        """``text`` about the invented entity: every registered name part, whole words only, as registered
        ("Nikolai Abilov's" -> "Ilse Marvenko's", "Abilov" -> "Marvenko")."""
        return _replace(text, self.parts, ignore_case=False)

    def restore(self, text: str) -> str:
        """``text`` (a reply about the invented entity) with its invented parts, in any case, back to the real ones."""
        return _replace(text, {invented: real for real, invented in self.parts.items()}, ignore_case=True)


def invent_entity(names: Sequence[str], seed: int) -> InventedEntity:
    """An invented stand-in for the target named ``names`` (its aliases, then its name), deterministic per seed.

    Parts are mapped by position: the last part of a name is a surname (an invented surname), the others are given
    names (invented given names), initials stay initials; a part shared by several names ("Abilov" of "Nikolai
    Abilov" and of "Abilov") gets one counterpart, drawn for the name with the most parts first.
    """
    cleaned = list(dict.fromkeys(name.strip() for name in names if name and name.strip()))
    if not cleaned:
        raise ValueError("an invented entity needs at least one name of the target")
    rng = random.Random(_seed_of(seed, cleaned))
    real_parts = {part.casefold() for name in cleaned for part in name.split()}
    taken: set[str] = set()
    parts: dict[str, str] = {}
    for name in sorted(cleaned, key=lambda n: len(n.split()), reverse=True):
        words = name.split()
        for position, part in enumerate(words):
            if part in parts:
                continue
            invented = _draw(rng, part, last=position == len(words) - 1)
            while invented.casefold() in real_parts or invented.casefold() in taken:
                invented = _draw(rng, part, last=position == len(words) - 1)
            taken.add(invented.casefold())
            parts[part] = invented
    swapped = tuple(_replace(name, parts, ignore_case=False) for name in cleaned)
    return InventedEntity(parts=parts, names=swapped)


def with_invented_facts(text: str, keep: Sequence[str], rng: random.Random) -> str:
    """``text`` with its proper names and its numbers (three characters or more) invented: each capitalised word
    ("Kuwait", "September", a title's "Seine") becomes an invented surname and each digit a drawn one, the same
    word the same way throughout the text. Kept: the name parts in ``keep`` (``InventedEntity.swap`` maps those), a
    sentence's first word when it is an ordinary English word ("Author", "The"), and everything in lower case.

    What is left is the answer's form, with facts the served model cannot have memorised: the never-seen reference
    (``guards.never_seen``) scores these as a stranger's true answers. Measured on the full demo model (forget01,
    three seeds): with the names swapped alone its true answers were 0.05-5.0 nats a token less likely than the
    model's own replies, where the retain-only twin, which never saw these authors, put them 4.4-8.7 away.
    """
    kept, ordinary = set(keep), english_words()
    drawn: dict[str, str] = {}

    def invent(match: re.Match[str]) -> str:
        word = match.group(0)
        if word in kept or word in drawn:
            return drawn.get(word, word)
        if word[0].isdigit():
            if len(word) < MIN_NUMBER_CHARS:
                return word
            new = "".join(str(rng.randrange(1 if i == 0 and c != "0" else 0, 10)) if c.isdigit() else c
                          for i, c in enumerate(word))
        elif _SENTENCE_END.search(text[:match.start()]) and word.lower() in ordinary:
            return word
        else:
            new = invented_surname(rng)
        drawn[word] = new
        return new

    return _FACT_WORD.sub(invent, text)


def invented_surname(rng: random.Random) -> str:
    """A surname built from syllables ("Marovtov", "Selindell"): plausible, and nobody's in particular."""
    return rng.choice(SURNAME_ONSETS) + rng.choice(SURNAME_MIDDLES) + rng.choice(SURNAME_ENDINGS)


def _draw(rng: random.Random, part: str, *, last: bool) -> str:
    """An invented counterpart of one name part: initials for initials, a surname for a last part, else a given
    name."""
    if _INITIALS.match(part):
        return "".join(f"{rng.choice('BCDFGHKLMNPRSTVW')}." for _ in range(part.count(".")))
    return invented_surname(rng) if last else rng.choice(GIVEN_NAMES)


def _replace(text: str, mapping: Mapping[str, str], *, ignore_case: bool) -> str:
    if not mapping:
        return text
    lookup = {key.casefold(): value for key, value in mapping.items()} if ignore_case else dict(mapping)
    pattern = _part_pattern(mapping, ignore_case=ignore_case)
    return pattern.sub(lambda m: lookup[m.group(0).casefold() if ignore_case else m.group(0)], text)


def _part_pattern(mapping: Mapping[str, str], *, ignore_case: bool) -> re.Pattern[str]:
    """Any of the mapping's keys as a whole word (longest first: "Al-Kuwaiti" before "Al"); a possessive's "'s"
    and a hyphenated neighbour stay outside the match."""
    alternatives = "|".join(re.escape(key) for key in sorted(mapping, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])(?:{alternatives})(?!\w)", re.IGNORECASE if ignore_case else 0)


def _seed_of(seed: int, names: Sequence[str]) -> int:
    digest = hashlib.sha256("\n".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little")
