"""GUARD's decoding-time restriction, run inside vLLM's worker by ``LetheLogitsProcessor``.

Forbidden phrases are matched on the *text* the tokens spell, case-insensitively, not on token ids: a byte-level BPE
model can spell "Promise by the Seine" as `"Prom`+`ise`… as easily as ` Promise`…, and a token-id trie over a few
tokenisation variants was measured to let exactly such spellings through. Each row runs one KMP automaton per phrase
(a character trie with failure links) over its text so far, prompt tail included, so a phrase the prompt starts cannot
be finished by the reply. Every step:

* hard ban (−inf): every token whose text would complete a phrase from any partial match (it starts with the rest of
  the phrase), and every token whose text contains a whole phrase;
* soft penalty: tokens whose text begins a phrase (at least ``MIN_STARTER_CHARS`` of it).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch

GUARD_KEY = "guard"
MIN_STARTER_CHARS = 3


class Vocabulary:
    """The lower-cased text of every token id, indexed for "starts with" and "contains" queries."""

    def __init__(self, strings: Sequence[str]) -> None:
        self.strings = [s.lower() for s in strings]
        self._sorted = sorted((s, i) for i, s in enumerate(self.strings) if s)
        self._keys = [s for s, _ in self._sorted]
        self._stripped: dict[str, list[int]] = {}
        for i, s in enumerate(self.strings):
            if len(s.strip()) >= MIN_STARTER_CHARS:
                self._stripped.setdefault(s.strip(), []).append(i)
        self.starting_with = lru_cache(maxsize=65536)(self._starting_with)
        self.containing = lru_cache(maxsize=16384)(self._containing)
        self.starting_phrase = lru_cache(maxsize=16384)(self._starting_phrase)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Vocabulary:
        return cls([tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))])

    def _starting_with(self, text: str) -> tuple[int, ...]:
        lo = bisect.bisect_left(self._keys, text)
        hi = bisect.bisect_left(self._keys, text + "\U0010ffff")
        return tuple(i for _, i in self._sorted[lo:hi])

    def _containing(self, text: str) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.strings) if text in s)

    def _starting_phrase(self, phrase: str) -> tuple[int, ...]:
        """Tokens that spell (without their leading space) the first few characters of the phrase."""
        return tuple(i for n in range(MIN_STARTER_CHARS, len(phrase) + 1) for i in self._stripped.get(phrase[:n], ()))


def failure_links(phrase: str) -> list[int]:
    """KMP: links[k] = length of the longest proper prefix of phrase[:k] that is also its suffix."""
    links = [0] * (len(phrase) + 1)
    k = 0
    for i in range(1, len(phrase)):
        while k and phrase[i] != phrase[k]:
            k = links[k]
        if phrase[i] == phrase[k]:
            k += 1
        links[i + 1] = k
    return links


class PhraseMatcher:
    """One phrase's KMP automaton: ``state`` = longest prefix of the phrase that the text so far ends with."""

    def __init__(self, phrase: str) -> None:
        self.phrase = phrase
        self.links = failure_links(phrase)
        self.state = 0

    def feed(self, text: str) -> None:
        k = self.state
        for char in text:
            while k and (k == len(self.phrase) or char != self.phrase[k]):
                k = self.links[k]
            if char == self.phrase[k]:
                k += 1
        self.state = k

    def partial_matches(self) -> list[int]:
        """Every k > 0 such that the text ends with phrase[:k] (k < len: a complete match needs no more banning)."""
        out = []
        k = self.state if self.state < len(self.phrase) else self.links[self.state]
        while k:
            out.append(k)
            k = self.links[k]
        return out


class PhraseGuardHook:
    """One row's GUARD state; ``apply`` is called once per decoding step with that row's logits."""

    def __init__(self, phrases: Sequence[str], penalty: float, vocabulary: Vocabulary,
                 prompt_ids: Sequence[int] | None, output_ids: list[int]) -> None:
        self.vocabulary = vocabulary
        self.matchers = [PhraseMatcher(p.lower()) for p in dict.fromkeys(phrases) if p.strip()]
        self.penalty = penalty
        self.output_ids = output_ids  # vLLM's live list: it grows by one token per step
        self.seen = 0
        longest = max((len(m.phrase) for m in self.matchers), default=0)
        tail = "".join(vocabulary.strings[t] for t in (prompt_ids or ())[-longest:] if 0 <= t < len(vocabulary.strings))
        self._feed(tail[-longest:] if longest else "")
        self._always: torch.Tensor | None = None
        self._starters: torch.Tensor | None = None
        self._completing: dict[tuple[int, int], torch.Tensor] = {}  # (matcher, state) -> ids that would complete

    def _feed(self, text: str) -> None:
        for matcher in self.matchers:
            matcher.feed(text)

    def apply(self, logits_row: torch.Tensor) -> None:
        strings = self.vocabulary.strings
        new = self.output_ids[self.seen:]
        self.seen = len(self.output_ids)
        if new:
            self._feed("".join(strings[t] for t in new if 0 <= t < len(strings)))
        vocab = logits_row.shape[-1]
        if self._always is None:
            always = {i for m in self.matchers for i in self.vocabulary.containing(m.phrase)}
            starters = {i for m in self.matchers for i in self.vocabulary.starting_phrase(m.phrase)} - always
            self._always = _index([i for i in always if i < vocab], logits_row.device)
            self._starters = _index([i for i in starters if i < vocab], logits_row.device)
        logits_row[self._always] = float("-inf")
        parts = [self._completing_ids(n, m, vocab, logits_row.device) for n, m in enumerate(self.matchers) if m.state]
        parts = [part for part in parts if len(part)]
        if parts:
            logits_row[torch.cat(parts)] = float("-inf")
        if self.penalty and len(self._starters):
            logits_row[self._starters] -= self.penalty


    def _completing_ids(self, number: int, matcher: PhraseMatcher, vocab: int, device: torch.device) -> torch.Tensor:
        """Tokens that would complete the phrase from the matcher's state (cached: states repeat)."""
        key = (number, matcher.state)
        if key not in self._completing:
            ids = {i for k in matcher.partial_matches() for i in self.vocabulary.starting_with(matcher.phrase[k:])}
            self._completing[key] = _index([i for i in ids if i < vocab], device)
        return self._completing[key]


def _index(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


def guard_row_hook(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                   vocabulary: Vocabulary | None) -> PhraseGuardHook | None:
    """The processor's factory: one hook for all GUARD payloads of a request (several targets: union of phrases)."""
    payloads = section.get(GUARD_KEY)
    if not payloads:
        return None
    if vocabulary is None:
        raise RuntimeError("GUARD needs the served tokenizer's vocabulary in the engine process")
    phrases = [str(phrase) for payload in payloads for phrase in payload.get("phrases", ())]
    if not phrases:
        return None
    penalty = max(float(payload.get("penalty", 0.0)) for payload in payloads)
    return PhraseGuardHook(phrases, penalty, vocabulary, prompt_ids, output_ids)


def validate_guard_section(section: Mapping[str, Any]) -> None:
    """Front-end check (becomes a 400, never an engine crash): a list of {phrases: [str], penalty: number}."""
    payloads = section.get(GUARD_KEY)
    if payloads is None:
        return
    if not isinstance(payloads, list):
        raise ValueError("lethe.guard must be a list")
    for payload in payloads:
        if not isinstance(payload, Mapping) or not isinstance(payload.get("phrases", []), list):
            raise ValueError("lethe.guard entries must be {phrases: [text], penalty: number}")
        if not isinstance(payload.get("penalty", 0.0), int | float):
            raise ValueError("lethe.guard penalty must be a number")
        if not all(isinstance(phrase, str) and phrase.strip() for phrase in payload.get("phrases", [])):
            raise ValueError("lethe.guard phrases must be non-empty strings")
