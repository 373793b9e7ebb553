"""Entity evidence: which named things a prompt mentions, and whose forget data they come from.

The embedding heads see topic: a question about any novelist's birthplace looks like a question about the registered
novelist's birthplace, and with a hundred targets one of the heads fires on most such questions (measured: 85 % of
questions about unregistered TOFU authors at 100 targets). Names and dates decide what topic cannot, so a head's hit
is weighed by them (``bank.py``):

- *linked*: the prompt mentions a named thing (a run of capitalised words, "Kuwait City", "The Breath Between Waves")
  or a year that occurs in the target's forget data or aliases — evidence *for* the target;
- *unlinked name*: the prompt mentions a run of capitalised words that occurs in no registered target's data
  ("Jaime Vasquez", "Golden Gate Bridge") — evidence that the prompt is about someone or something else;
- *contradicting year*: the prompt gives a year the target's data do not hold — evidence against that target.

Only runs of two or more capitalised words count as names: a single capitalised word is as often a sentence's first
word as a name. A run's key is its folded words (``canonical.fold``, possessive "'s" dropped); a run that opens a
sentence with a question or request word is also looked up without it ("Is Isabelle Martínez married?" -> "isabelle
martinez") — anywhere else the first word is a first name ("Rani Kapoor" is not "Kapoor").
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from classifiers.canonical import canonical_text, fold

# A name word: a capitalised word, possibly hyphenated or with an apostrophe ("Al-Kuwaiti", "Tae-ho", "O'Brien").
_NAME_WORD = r"[A-Z\u00C0-\u00DE][\w\u00C0-\u024F]*(?:['\u2019-][\w\u00C0-\u024F]+)*"
CAPITALISED_RUN = re.compile(rf"{_NAME_WORD}(?:[ \t]+{_NAME_WORD})+")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"'\u201c\u2018(]\s*)$")
YEAR = re.compile(r"\b(1[0-9]\d\d|20\d\d)\b")


# Words that open a question or request and are capitalised for that reason alone ("Is Isabelle Martínez married?").
_LEADING_WORDS = frozenset(
    "a an and are at can could describe did do does explain for give had has have how in is list may might name of on "
    "please should summarize summarise tell the was were what when where which who whom whose why will would write"
    .split())
_POSSESSIVE = re.compile(r"['\u2019]s$")


def _key(words: Iterable[str]) -> str:
    return " ".join(fold(_POSSESSIVE.sub("", word)) for word in words)


def name_runs(text: str) -> list[list[str]]:
    """The runs of two or more capitalised words in ``text``, as word lists."""
    return [match.group(0).split() for match in CAPITALISED_RUN.finditer(text)]


def _opens_sentence(text: str, start: int) -> bool:
    return bool(_SENTENCE_START.search(text[max(0, start - 3) : start]))


def vocabulary(texts: Iterable[str]) -> set[str]:
    """The entity keys a target's data define: every sub-run of two or more words of its capitalised runs, and its
    years."""
    keys: set[str] = set()
    for text in map(canonical_text, texts):
        for words in name_runs(text):
            for start in range(len(words)):
                for stop in range(start + 2, len(words) + 1):  # two words at least: one alone is no name
                    keys.add(_key(words[start:stop]))
        keys.update(YEAR.findall(text))
    return keys


@dataclass(frozen=True)
class Mentions:
    """The named things of one prompt text: each run as (full key, key without its first word when that is a leading
    question or request word, else ""), and its years."""

    runs: tuple[tuple[str, str], ...]
    years: frozenset[str]

    @classmethod
    def of(cls, text: str) -> Mentions:
        runs = []
        for match in CAPITALISED_RUN.finditer(text):
            words = match.group(0).split()
            leading = _opens_sentence(text, match.start()) and words[0].casefold() in _LEADING_WORDS
            runs.append((_key(words), _key(words[1:]) if leading else ""))
        return cls(tuple(runs), frozenset(YEAR.findall(text)))


@dataclass(frozen=True)
class Evidence:
    """What a text's mentions say about the registered targets: the targets some mention links to, whether some name
    links to none of them, and — when the text gives years — the targets whose data hold every one of them (a year
    another target's data lack is a fact that contradicts it: "born in Riyadh in 1964" is not the 1939 Riyadh author).
    """

    linked: frozenset[str]
    unlinked_name: bool
    dated: frozenset[str] | None = None  # None: the text gives no year
    strongly_linked: frozenset[str] = frozenset()  # linked by two or more distinct mentions ("Kuwait City", "1956")


class EntityIndex:
    """Every target's entity vocabulary in one map from key to owners; a lookup costs the prompt's few mentions."""

    def __init__(self, vocabularies: Mapping[str, Iterable[str]]) -> None:
        owners: dict[str, set[str]] = defaultdict(set)
        for target_id, keys in vocabularies.items():
            for key in keys:
                owners[key].add(target_id)
        self._owners = {key: frozenset(ids) for key, ids in owners.items()}

    def _owners_of(self, key: str) -> frozenset[str]:
        return self._owners.get(key, frozenset())

    def evidence(self, text: str) -> Evidence:
        mentions = Mentions.of(canonical_text(text))  # a disguised place or year is still that place or year
        links: Counter[str] = Counter()
        unlinked_name = False
        for full, tail in dict.fromkeys(mentions.runs):
            owners = self._owners_of(full) | (self._owners_of(tail) if tail else frozenset())
            links.update(owners)
            unlinked_name = unlinked_name or not owners
        dated: frozenset[str] | None = None
        for year in mentions.years:
            owners = self._owners_of(year)
            links.update(owners)
            dated = owners if dated is None else dated & owners
        strong = frozenset(target for target, count in links.items() if count >= 2)
        return Evidence(frozenset(links), unlinked_name, dated, strong)
