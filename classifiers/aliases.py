"""Finding mentions of targets' names in text: case, punctuation, diacritics, partial names, typos and spelling
tricks tolerated.

Text and names are read in the canonical form of ``classifiers/canonical.py`` (format characters removed, look-alike
letters mapped, compatibility forms unified), so "Ba\u200bsil", "Ваsil" (Cyrillic) and "Ｂａｓｉｌ" read "Basil"; spans
still index the original text. A name is split into *parts* at whitespace ("Basil", "Mahfouz", "Al-Kuwaiti"); a
part's key is its letters, folded ("alkuwaiti"), so "Al-Kuwaiti", "al kuwaiti", "AL-KUWAITI" and "Al-Kuwaití" are one
key. A mention is a run of adjacent text tokens that matches, part by part, one of a target's aliases:

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
probes per text token, not a scan over every target's names; a token too long to be any key within its typo
budget skips them, so the cost per token is bounded by the names indexed, not by the text (a 1,250-letter "word" once
cost 40 s and 1 GB).

Names written to slip past a word matcher (undone by the tokenizer, ``classifiers/alias_tokens.py``):

- run together: "basilmahfouz" is one token; the concatenations of consecutive parts ("basilmahfouz",
  "mahfouzalkuwaiti", the whole name) and of the first and last ("basilalkuwaiti") are indexed as *compound* keys
  that stand for those parts, with the typo budget of their length (never one that is a common word or shorter than
  6 letters: "Li Na" is no "Lina");
  "BasilMahfouzAlKuwaiti" is split at its case changes instead.
- spaced out: a run of 3 or more one-character tokens with the same short separator ("B a s i l", "A-l-K-u-w-a-i-t-i",
  "K.u.w.a.i.t.i") is read as one token spanning the run, then split at its case changes like any other.
- digits for letters: in a token that mixes letters with digits, "@" or "$" ("B4sil", "Kuw41ti"), those read as the
  letters they imitate ("1" as "l" and, second reading, "i"); a number ("1956", "08/09/1956") stays a number.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from rapidfuzz.distance import Levenshtein

from classifiers.alias_tokens import Token, form_tokens, tokenize
from classifiers.canonical import AliasForm, alias_form, fold
from classifiers.types import AliasSpan

logger = logging.getLogger(__name__)

# Characters that may separate the tokens of one name part: "Al-Kuwaiti", "Al Kuwaiti", "O'Brien", "R.R.".
_PART_JOINERS = frozenset(" -'\u2019\u2010\u2011\u2013.")
_MAX_TOKENS_PER_PART = 3
_MIN_COMPOUND_LETTERS = 6

SCORE_ALL_PARTS = 1.0
SCORE_SEVERAL_PARTS = 0.95
SCORE_LAST_PART = 0.9
_MIN_DISTINCTIVE_LETTERS = 4


def max_edits(key: str) -> int:
    """Typo budget of a name part: none for short parts (too many near neighbours), 1 for 5-9 letters, 2 from 10."""
    return _budget(len(key))


def _budget(length: int) -> int:
    return 2 if length >= 10 else 1 if length >= 5 else 0


@lru_cache(maxsize=1)
def default_common_words() -> frozenset[str]:
    """Whole-word entries of the packaged MiniLM WordPiece vocabulary: frequent English words and names."""
    from classifiers.embedding import default_model_path

    vocab_path = default_model_path() / "vocab.txt"
    with vocab_path.open(encoding="utf-8") as f:
        words = {line.strip() for line in f}
    return frozenset(fold(w) for w in words if w.isalpha() and not w.startswith("##") and len(w) > 1)


@dataclass(frozen=True)
class _Alias:
    target_id: str
    text: str
    parts: tuple[str, ...]  # folded keys, in name order
    alone_ok: tuple[bool, ...]  # whether each part counts on its own


@dataclass(frozen=True)
class _PartMatch:
    alias: int
    parts: tuple[int, ...]  # which parts of the alias (several for a compound key)
    first_token: int
    last_token: int
    sim: float


MIN_ALIAS_LETTERS = 3


@lru_cache(maxsize=1)
def _function_words() -> frozenset[str]:
    """The most frequent English words (scikit-learn's stop-word list, which Lethe ships), folded."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(fold(word) for word in ENGLISH_STOP_WORDS)


def alias_problem(alias: str) -> str | None:
    """Why ``alias`` cannot be registered, or None. A mention of an alias is a hit wherever it appears, so one of
    fewer than three letters ("I", "AI") or of common words only ("the", "of the") would flag nearly every prompt and
    put every reply under a target's guards. (A common surname as the last part of a longer alias is fine: it never
    counts alone.)"""
    keys = [_part_key(part) for part in _raw_parts(alias)]
    if sum(len(key) for key in keys) < MIN_ALIAS_LETTERS:
        return f"an alias needs at least {MIN_ALIAS_LETTERS} letters or digits"
    if all(key in _function_words() for key in keys):
        return "an alias of common words only would flag nearly every request; use a distinctive name"
    return None


def _raw_parts(alias: str) -> list[str]:
    """The whitespace/comma-separated parts of a name that contain letters, as written."""
    return [part for part in re.split(r"[\s,]+", alias) if fold(part)]


def _part_key(raw_part: str) -> str:
    return "".join(token.keys[0] for token in tokenize(raw_part))


def _deletions(word: str, depth: int) -> set[str]:
    """All strings obtained from `word` by deleting up to `depth` characters (the SymSpell neighbourhood)."""
    frontier = {word}
    found = {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


class _KeyIndex:
    """Keys (name parts, or compounds of parts run together), each found exactly or within its typo budget."""

    def __init__(self) -> None:
        self.postings: dict[str, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)  # key -> (alias, parts)
        self._neighbours: dict[str, set[str]] = defaultdict(set)  # deletion variant -> keys
        self._key_tokens: dict[str, set[int]] = defaultdict(set)  # key -> how many tokens it is written as
        self._depth: dict[int, int] = {}  # text unit length -> deletions a lookup of it needs

    def add(self, key: str, posting: tuple[int, tuple[int, ...]], token_counts: Iterable[int]) -> None:
        if key not in self.postings:
            for variant in _deletions(key, max_edits(key)):
                self._neighbours[variant].add(key)
        self.postings[key].append(posting)
        self._key_tokens[key].update(token_counts)

    def freeze(self) -> None:
        self.postings = dict(self.postings)
        self._neighbours = dict(self._neighbours)
        # A text unit can only be a typo of a key whose length is within that key's budget of its own, so its
        # deletion neighbourhood (quadratic in its length) is built only as deep as the largest such budget, and not
        # at all when there is none: a lookup costs at most a bounded amount per token of the text, however long.
        for length in {len(k) for k in self.postings}:
            budget = _budget(length)
            for near in range(length - budget, length + budget + 1):
                self._depth[near] = max(budget, self._depth.get(near, 0))

    def lookup(self, unit: str, n_tokens: int, *, exact_only: bool) -> list[tuple[str, float]]:
        """Keys matching `unit`: exactly, or (unless `exact_only`) within the key's typo budget."""
        found = [(unit, 1.0)] if unit in self.postings else []
        depth = self._depth.get(len(unit), 0)
        if exact_only or depth == 0:
            return found
        seen = {unit}
        for variant in _deletions(unit, depth):
            for key in self._neighbours.get(variant, ()):
                if key in seen or n_tokens not in self._key_tokens[key]:
                    continue
                seen.add(key)
                budget = max_edits(key)
                distance = Levenshtein.distance(unit, key, score_cutoff=budget)
                if 0 < distance <= budget:
                    found.append((key, 1.0 - distance / max(len(unit), len(key))))
        return found


class AliasIndex:
    """All active targets' aliases in one structure; `find(text)` costs the same for 1 or 1,000 targets."""

    def __init__(self, aliases_by_target: Mapping[str, Sequence[str]], *, common_words: frozenset[str] | None = None):
        self._common = default_common_words() if common_words is None else common_words
        self._aliases: list[_Alias] = []
        self._parts = _KeyIndex()
        self._compounds = _KeyIndex()  # several parts written as one token, looked up for single tokens
        for target_id, aliases in aliases_by_target.items():
            for alias in dict.fromkeys(a.strip() for a in aliases if a.strip()):
                self._add(target_id, alias)
        self._parts.freeze()
        self._compounds.freeze()

    def _add(self, target_id: str, alias: str) -> None:
        raw_parts = _raw_parts(alias)
        parts = tuple(_part_key(p) for p in raw_parts)
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
            tokens = tokenize(raw)
            # as many tokens as it is written with, or as it has words when its camelCase is not split ("Mcdonald")
            counts = {len(tokens), sum(not t.glued for t in tokens)}
            self._parts.add(key, (alias_index, (part_index,)), counts)
        for combination in _compound_parts(len(parts)):
            compound = "".join(parts[i] for i in combination)
            if len(compound) >= _MIN_COMPOUND_LETTERS and compound not in self._common:
                self._compounds.add(compound, (alias_index, combination), (1,))

    def _is_distinctive(self, raw_part: str, key: str) -> bool:
        """A last name that identifies its owner alone: hyphenated/apostrophed ("Al-Kuwaiti") or rare ("Abilov")."""
        multi_token = sum(not token.glued for token in tokenize(raw_part)) > 1
        return multi_token or (len(key) >= _MIN_DISTINCTIVE_LETTERS and key not in self._common)

    @property
    def target_ids(self) -> set[str]:
        return {a.target_id for a in self._aliases}

    def find(self, text: str) -> dict[str, list[AliasSpan]]:
        """Mentions of every indexed target in `text`: {target_id: non-overlapping spans, best first}."""
        form = alias_form(text)
        tokens = form_tokens(form)
        matches = self._part_matches(form, tokens)
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

    def _part_matches(self, form: AliasForm, tokens: list[Token]) -> list[_PartMatch]:
        """Every (alias part, run of 1-3 adjacent tokens) pair whose folded letters match exactly or within typos, and
        every (consecutive parts, single token) pair for a name written run together; best similarity per pair."""
        best: dict[tuple[int, tuple[int, ...], int, int], float] = {}
        common = [any(key in self._common for key in t.keys) for t in tokens]
        joined = [False, *(_joinable(form.text, left, right) for left, right in zip(tokens, tokens[1:]))]
        for first, token in enumerate(tokens):
            units = token.keys
            # Only exact matches for runs of common words ("the author" is no typo of anyone's name).
            exact_only = common[first]
            self._collect(self._compounds, units, 1, exact_only, (first, first), best)
            last = first
            while True:
                self._collect(self._parts, units, last - first + 1, exact_only, (first, last), best)
                last += 1
                if last - first == _MAX_TOKENS_PER_PART or last == len(tokens) or not joined[last]:
                    break
                units = tuple(dict.fromkeys(unit + key for unit in units for key in tokens[last].keys))
                exact_only = exact_only and common[last]
        return [_PartMatch(*pair, sim) for pair, sim in best.items()]

    @staticmethod
    def _collect(index: _KeyIndex, units: Iterable[str], n_tokens: int, exact_only: bool, token_run: tuple[int, int],
                 best: dict[tuple[int, tuple[int, ...], int, int], float]) -> None:
        for unit in units:
            for key, sim in index.lookup(unit, n_tokens, exact_only=exact_only):
                for alias_index, parts in index.postings[key]:
                    pair = (alias_index, parts, *token_run)
                    best[pair] = max(sim, best.get(pair, 0.0))


def _compound_parts(n_parts: int) -> list[tuple[int, ...]]:
    """The parts a name run together may hold: two or more consecutive ones, or the first and the last."""
    runs = [tuple(range(first, last + 1)) for first in range(n_parts) for last in range(first + 1, n_parts)]
    return list(dict.fromkeys([*runs, (0, n_parts - 1)])) if n_parts > 2 else runs


def _joinable(form: str, left: Token, right: Token) -> bool:
    gap = form[left.form_end : right.form_start]
    return len(gap) <= 1 and all(ch in _PART_JOINERS for ch in gap)


def _chains(matches: list[_PartMatch]) -> list[list[_PartMatch]]:
    """Maximal runs of part matches on adjacent tokens, each part used once; best-similarity extension first."""
    starts: dict[int, list[_PartMatch]] = defaultdict(list)
    for m in matches:
        starts[m.first_token].append(m)
    chains = []
    for m in matches:
        chain = [m]
        used = set(m.parts)
        while True:
            following = [n for n in starts.get(chain[-1].last_token + 1, ()) if used.isdisjoint(n.parts)]
            if not following:
                break
            nxt = max(following, key=lambda n: (n.sim, n.last_token))
            chain.append(nxt)
            used.update(nxt.parts)
        chains.append(chain)
    return chains


def _chain_score(alias: _Alias, chain: list[_PartMatch]) -> float:
    """Score of a chain per the rules in the module docstring; 0 when it is not a mention (a lone first name)."""
    sim = sum(m.sim for m in chain) / len(chain)
    parts = {part for m in chain for part in m.parts}
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

