"""Finding mentions of targets' names in text: case, punctuation, diacritics, partial names and typos tolerated.

A name is split into *parts* at whitespace ("Basil", "Mahfouz", "Al-Kuwaiti"); a part's key is its letters, folded
("alkuwaiti"), so "Al-Kuwaiti", "al kuwaiti", "AL-KUWAITI" and "Al-Kuwaití" are one key. A mention is a run of
adjacent text tokens that matches, part by part, one of a target's aliases:

- every part, in any order ("Basil Mahfouz Al-Kuwaiti", "Al-Kuwaiti Basil Mahfouz")              score 1.00 x sim
- two or more parts of one alias ("Basil Al-Kuwaiti", "basil mahfouz")                          score 0.95 x sim
- the last part alone, when it is distinctive ("Al-Kuwaiti", "Abilov")                           score 0.90 x sim
- an alias that is a single word, alone                                                            score 1.00 x sim

A first or middle name alone never counts ("Basil", "Mahfouz" of Naguib Mahfouz), nor a last name that is a common
word or common name ("Park", "Chen", "Williams", "Montenegro"): those would flag unrelated prompts ("where can I
park", "Serena Williams"). "Common" means: a whole-word entry of the default embedding model's 30k-entry WordPiece
vocabulary (22k English words and frequent names), a cheap proxy for word frequency that ships with Lethe;
callers may pass their own list.

Typos: a part of 5-9 letters matches at Levenshtein distance 1, of 10+ letters at distance 2 ("Al Kuwaity",
"Abilof"), with sim = 1 - distance / length, and only by a run of as many tokens as the part has (so "Kuwaiti" alone
is no typo of "Al-Kuwaiti"). Common words, alone or in runs, are only matched exactly ("Basel" is a city, not a typo
of "Basil"). Candidates come from a deletion-neighbourhood index (SymSpell), so looking up a text costs dictionary
probes per text token, not a scan over every target's names; a token too long to be any name part within its typo
budget skips them, so the cost per token is bounded by the names indexed, not by the text (a 1,250-letter "word" once
cost 40 s and 1 GB).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from rapidfuzz.distance import Levenshtein

from classifiers.types import AliasSpan

logger = logging.getLogger(__name__)

# A token: letters/digits, possibly followed by combining marks (decomposed diacritics stay inside the token).
_TOKEN = re.compile(r"[^\W_](?:[^\W_]|[\u0300-\u036f])*")
# Characters that may separate the tokens of one name part: "Al-Kuwaiti", "Al Kuwaiti", "O'Brien", "R.R.".
_PART_JOINERS = frozenset(" -'\u2019\u2010\u2011\u2013.")
_APOSTROPHES = frozenset("'\u2019")
_MAX_TOKENS_PER_PART = 3

SCORE_ALL_PARTS = 1.0
SCORE_SEVERAL_PARTS = 0.95
SCORE_LAST_PART = 0.9
_MIN_DISTINCTIVE_LETTERS = 4


def fold(text: str) -> str:
    """Case- and diacritic-insensitive form of a token: NFKD, combining marks dropped, casefolded, letters only."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch) and ch.isalnum()).casefold()


def max_edits(key: str) -> int:
    """Typo budget of a name part: none for short parts (too many near neighbours), 1 for 5-9 letters, 2 from 10."""
    if len(key) >= 10:
        return 2
    if len(key) >= 5:
        return 1
    return 0


@lru_cache(maxsize=1)
def default_common_words() -> frozenset[str]:
    """Whole-word entries of the packaged MiniLM WordPiece vocabulary: frequent English words and names."""
    from classifiers.embedding import default_model_path

    vocab_path = default_model_path() / "vocab.txt"
    with vocab_path.open(encoding="utf-8") as f:
        words = {line.strip() for line in f}
    return frozenset(fold(w) for w in words if w.isalpha() and not w.startswith("##") and len(w) > 1)


@dataclass(frozen=True)
class _Token:
    key: str
    start: int
    end: int


@dataclass(frozen=True)
class _Alias:
    target_id: str
    text: str
    parts: tuple[str, ...]  # folded keys, in name order
    alone_ok: tuple[bool, ...]  # whether each part counts on its own


@dataclass(frozen=True)
class _PartMatch:
    alias: int
    part: int
    first_token: int
    last_token: int
    sim: float


def tokenize(text: str) -> list[_Token]:
    """Folded word tokens with character offsets into `text`; a possessive "'s" is dropped."""
    tokens = []
    for match in _TOKEN.finditer(text):
        key = fold(match.group(0))
        if not key:
            continue
        if key == "s" and match.start() > 0 and text[match.start() - 1] in _APOSTROPHES:
            continue
        tokens.append(_Token(key, match.start(), match.end()))
    return tokens


def _raw_parts(alias: str) -> list[str]:
    """The whitespace/comma-separated parts of a name that contain letters, as written."""
    return [part for part in re.split(r"[\s,]+", alias) if fold(part)]


def _deletions(word: str, depth: int) -> set[str]:
    """All strings obtained from `word` by deleting up to `depth` characters (the SymSpell neighbourhood)."""
    frontier = {word}
    found = {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


class AliasIndex:
    """All active targets' aliases in one structure; `find(text)` costs the same for 1 or 1,000 targets."""

    def __init__(self, aliases_by_target: Mapping[str, Sequence[str]], *, common_words: frozenset[str] | None = None):
        self._common = default_common_words() if common_words is None else common_words
        self._aliases: list[_Alias] = []
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)  # part key -> (alias, part)
        self._neighbours: dict[str, set[str]] = defaultdict(set)  # deletion variant -> part keys
        self._key_tokens: dict[str, set[int]] = defaultdict(set)  # part key -> how many tokens it is written as
        for target_id, aliases in aliases_by_target.items():
            for alias in dict.fromkeys(a.strip() for a in aliases if a.strip()):
                self._add(target_id, alias)
        self._postings = dict(self._postings)
        self._neighbours = dict(self._neighbours)
        self._max_unit_edits = max((max_edits(k) for k in self._postings), default=0)
        # A text unit more than the typo budget longer than every name part can match none: its deletion neighbourhood
        # (quadratic in its length) is never built, so a lookup costs at most a bounded amount per token of the text.
        self._max_fuzzy_length = max((len(k) for k in self._postings), default=0) + self._max_unit_edits

    def _add(self, target_id: str, alias: str) -> None:
        raw_parts = _raw_parts(alias)
        parts = tuple(fold(p) for p in raw_parts)
        if not parts:
            logger.warning("alias of target %s has no letters; ignored", target_id)
            return
        alias_index = len(self._aliases)
        last = len(parts) - 1
        alone_ok = tuple(
            len(parts) == 1 or (i == last and self._is_distinctive(raw_parts[i], key)) for i, key in enumerate(parts)
        )
        self._aliases.append(_Alias(target_id, alias, parts, alone_ok))
        for part_index, (raw, key) in enumerate(zip(raw_parts, parts)):
            self._postings[key].append((alias_index, part_index))
            self._key_tokens[key].add(len(tokenize(raw)))
            for variant in _deletions(key, max_edits(key)):
                self._neighbours[variant].add(key)

    def _is_distinctive(self, raw_part: str, key: str) -> bool:
        """A last name that identifies its owner alone: hyphenated/apostrophed ("Al-Kuwaiti") or rare ("Abilov")."""
        multi_token = len(tokenize(raw_part)) > 1
        return multi_token or (len(key) >= _MIN_DISTINCTIVE_LETTERS and key not in self._common)

    @property
    def target_ids(self) -> set[str]:
        return {a.target_id for a in self._aliases}

    def find(self, text: str) -> dict[str, list[AliasSpan]]:
        """Mentions of every indexed target in `text`: {target_id: non-overlapping spans, best first}."""
        tokens = tokenize(text)
        matches = self._part_matches(text, tokens)
        if not matches:
            return {}
        by_alias: dict[int, list[_PartMatch]] = defaultdict(list)
        for m in matches:
            by_alias[m.alias].append(m)
        candidates: dict[str, list[AliasSpan]] = defaultdict(list)
        for alias_index, alias_matches in by_alias.items():
            alias = self._aliases[alias_index]
            for chain in _chains(alias_matches):
                score = _chain_score(alias, chain)
                if score > 0:
                    start, end = tokens[chain[0].first_token].start, tokens[chain[-1].last_token].end
                    candidates[alias.target_id].append(AliasSpan(start, end, alias.text, round(score, 4)))
        return {tid: _merge_overlapping(spans) for tid, spans in candidates.items()}

    def _part_matches(self, text: str, tokens: list[_Token]) -> list[_PartMatch]:
        """Every (alias part, run of 1-3 adjacent tokens) pair whose folded letters match exactly or within typos."""
        matches: list[_PartMatch] = []
        common = [t.key in self._common for t in tokens]
        for first in range(len(tokens)):
            unit = ""
            for last in range(first, min(first + _MAX_TOKENS_PER_PART, len(tokens))):
                if last > first and not _joinable(text, tokens[last - 1], tokens[last]):
                    break
                unit += tokens[last].key
                # Only exact matches for runs of common words ("the author" is no typo of anyone's name).
                exact_only = all(common[first : last + 1])
                for key, sim in self._lookup(unit, last - first + 1, exact_only=exact_only):
                    for alias_index, part_index in self._postings[key]:
                        matches.append(_PartMatch(alias_index, part_index, first, last, sim))
        return matches

    def _lookup(self, unit: str, n_tokens: int, *, exact_only: bool) -> Iterable[tuple[str, float]]:
        """Part keys matching `unit`: exactly, or (unless `exact_only`) within the key's typo budget."""
        if unit in self._postings:
            yield unit, 1.0
        if exact_only or len(unit) < 4 or len(unit) > self._max_fuzzy_length or self._max_unit_edits == 0:
            return
        seen = {unit}
        for variant in _deletions(unit, min(self._max_unit_edits, max_edits(unit) + 1)):
            for key in self._neighbours.get(variant, ()):
                if key in seen or n_tokens not in self._key_tokens[key]:
                    continue
                seen.add(key)
                budget = max_edits(key)
                distance = Levenshtein.distance(unit, key, score_cutoff=budget)
                if 0 < distance <= budget:
                    yield key, 1.0 - distance / max(len(unit), len(key))


def _joinable(text: str, left: _Token, right: _Token) -> bool:
    gap = text[left.end : right.start]
    return len(gap) <= 1 and all(ch in _PART_JOINERS for ch in gap)


def _chains(matches: list[_PartMatch]) -> list[list[_PartMatch]]:
    """Maximal runs of part matches on adjacent tokens, each part used once; best-similarity extension first."""
    starts: dict[int, list[_PartMatch]] = defaultdict(list)
    for m in matches:
        starts[m.first_token].append(m)
    chains = []
    for m in matches:
        chain = [m]
        used = {m.part}
        while True:
            following = [n for n in starts.get(chain[-1].last_token + 1, ()) if n.part not in used]
            if not following:
                break
            nxt = max(following, key=lambda n: (n.sim, n.last_token))
            chain.append(nxt)
            used.add(nxt.part)
        chains.append(chain)
    return chains


def _chain_score(alias: _Alias, chain: list[_PartMatch]) -> float:
    """Score of a chain per the rules in the module docstring; 0 when it is not a mention (a lone first name)."""
    sim = sum(m.sim for m in chain) / len(chain)
    parts = {m.part for m in chain}
    if len(parts) == len(alias.parts):
        return SCORE_ALL_PARTS * sim
    if len(parts) >= 2:
        return SCORE_SEVERAL_PARTS * sim
    (part,) = parts
    return SCORE_LAST_PART * sim if alias.alone_ok[part] else 0.0


def _merge_overlapping(spans: list[AliasSpan]) -> list[AliasSpan]:
    """Overlapping mentions merged into their union (so ECO covers the whole name), with the best score; best first."""
    merged: list[AliasSpan] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            best = last if last.score >= span.score else span
            merged[-1] = AliasSpan(last.start, max(last.end, span.end), best.alias, best.score)
        else:
            merged.append(span)
    return sorted(merged, key=lambda s: (-s.score, s.start))


class AliasMatcher:
    """The aliases of one target: `find(text)` gives its mentions, `matches(text)` the best mention's score."""

    _ID = "target"

    def __init__(self, aliases: Sequence[str], *, common_words: frozenset[str] | None = None):
        self.aliases = list(aliases)
        self._index = AliasIndex({self._ID: self.aliases}, common_words=common_words)

    def find(self, text: str) -> list[AliasSpan]:
        return self._index.find(text).get(self._ID, [])

    def matches(self, text: str) -> float:
        return max((span.score for span in self.find(text)), default=0.0)


def expand_variants(aliases: Sequence[str]) -> list[str]:
    """Name forms a user may type for these aliases: each alias, first + last, and a distinctive last name alone.

    Used to generate training prompts; mirrors the matching rules so that the head also learns partial names.
    """
    forms: dict[str, None] = {}
    index = AliasIndex({"t": aliases})
    for alias in aliases:
        words = alias.split()
        forms[alias] = None
        if len(words) >= 3:
            forms[f"{words[0]} {words[-1]}"] = None
        if len(words) >= 2 and index.find(words[-1]):
            forms[words[-1]] = None
    return list(forms)

