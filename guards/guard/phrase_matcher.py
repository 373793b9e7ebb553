"""GUARD's decoding-time restriction, run inside vLLM's worker by ``LetheLogitsProcessor``.

Forbidden phrases are matched on the *text* the tokens spell, case-insensitively, not on token ids: a byte-level BPE
model can spell "Promise by the Seine" as `"Prom`+`ise`… as easily as ` Promise`…, and a token-id trie over a few
tokenisation variants was measured to let exactly such spellings through. Each row runs one Aho-Corasick automaton
over all its phrases (a character trie with failure links) on its text so far, prompt tail included, so a phrase the
prompt starts cannot be finished by the reply. Every step:

* ban (−inf, or the calibrated finite ``ban`` penalty of ``guards.guard.calibration``): every token whose text would
  complete a phrase from any partial match (it starts with the rest of the phrase), and every token whose text
  contains a whole phrase;
* soft penalty: tokens whose text begins a phrase (at least ``MIN_STARTER_CHARS`` of it).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch

from guards.guard.payload import GUARD_KEY, resolve_phrases

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


class PhraseAutomaton:
    """Aho-Corasick over a request's lower-cased phrases: one state per row, whatever the number of phrases.

    A state is a trie node (a prefix of some phrase); its failure chain lists every phrase prefix the text ends with.
    The tokens banned in a state are those whose text starts with the rest of a phrase from any node of that chain;
    states repeat, so that set is computed once per state.
    """

    def __init__(self, phrases: Sequence[str], vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.goto: list[dict[str, int]] = [{}]
        self.remainders: list[set[str]] = [set()]  # per node: what completes a phrase through it
        for phrase in phrases:
            node = 0
            for k, char in enumerate(phrase):
                if char not in self.goto[node]:
                    self.goto.append({})
                    self.remainders.append(set())
                    self.goto[node][char] = len(self.goto) - 1
                node = self.goto[node][char]
                if k + 1 < len(phrase):
                    self.remainders[node].add(phrase[k + 1:])
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first: a node's failure link is set before its children's
            node = queue.popleft()
            for char, child in self.goto[node].items():
                link = self.fail[node]
                while link and char not in self.goto[link]:
                    link = self.fail[link]
                target = self.goto[link].get(char, 0)
                self.fail[child] = target if target != child else 0
                queue.append(child)
        self._banned: dict[tuple[int, int], torch.Tensor] = {}

    def feed(self, state: int, text: str) -> int:
        for char in text:
            while state and char not in self.goto[state]:
                state = self.fail[state]
            state = self.goto[state].get(char, 0)
        return state

    def banned(self, state: int, vocab: int, device: torch.device) -> torch.Tensor:
        """Tokens that would complete a phrase in this state."""
        key = (state, vocab)
        if key not in self._banned:
            ids: set[int] = set()
            node = state
            while node:
                for remainder in self.remainders[node]:
                    ids.update(self.vocabulary.starting_with(remainder))
                node = self.fail[node]
            self._banned[key] = _index([i for i in ids if i < vocab], device)
        return self._banned[key]


class PhraseGuardHook:
    """One row's GUARD state; ``apply`` is called once per decoding step with that row's logits."""

    def __init__(self, phrases: Sequence[str], penalty: float, vocabulary: Vocabulary,
                 prompt_ids: Sequence[int] | None, output_ids: list[int], ban: float | None = None) -> None:
        self.vocabulary = vocabulary
        self.phrases = [p.lower() for p in dict.fromkeys(phrases) if p.strip()]
        self.automaton = PhraseAutomaton(self.phrases, vocabulary)
        self.penalty = penalty
        self.ban = ban  # None: banned tokens get -inf
        self.output_ids = output_ids  # vLLM's live list: it grows by one token per step
        self.seen = 0
        longest = max((len(p) for p in self.phrases), default=0)
        strings = vocabulary.strings
        tail = "".join(strings[t] for t in (prompt_ids or ())[-longest:] if 0 <= t < len(strings))
        self.state = self.automaton.feed(0, tail[-longest:] if longest else "")
        self._always: torch.Tensor | None = None
        self._starters: torch.Tensor | None = None

    def apply(self, logits_row: torch.Tensor) -> None:
        strings = self.vocabulary.strings
        new = self.output_ids[self.seen:]
        self.seen = len(self.output_ids)
        if new:
            self.state = self.automaton.feed(self.state, "".join(strings[t] for t in new if 0 <= t < len(strings)))
        vocab = logits_row.shape[-1]
        if self._always is None:
            always = {i for p in self.phrases for i in self.vocabulary.containing(p)}
            starters = {i for p in self.phrases for i in self.vocabulary.starting_phrase(p)} - always
            self._always = _index([i for i in always if i < vocab], logits_row.device)
            self._starters = _index([i for i in starters if i < vocab], logits_row.device)
        self._ban(logits_row, self._always)
        if self.state:
            self._ban(logits_row, self.automaton.banned(self.state, vocab, logits_row.device))
        if self.penalty and len(self._starters):
            logits_row[self._starters] -= self.penalty


    def _ban(self, logits_row: torch.Tensor, ids: torch.Tensor) -> None:
        if self.ban is None:
            logits_row[ids] = float("-inf")
        else:
            logits_row[ids] -= self.ban


def _index(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.long, device=device)


def guard_row_hook(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                   vocabulary: Vocabulary | None) -> PhraseGuardHook | None:
    """The processor's factory: one hook for all GUARD payloads of a request (several targets: union of phrases).

    Each payload is a reference (``payload.py``): its phrases are read here, in the engine process, from the artifact
    it names, so they never travel in ``extra_args``."""
    payloads = section.get(GUARD_KEY)
    if not payloads:
        return None
    if vocabulary is None:
        raise RuntimeError("GUARD needs the served tokenizer's vocabulary in the engine process")
    phrases = [phrase for payload in payloads for phrase in resolve_phrases(payload)]
    if not phrases:
        return None
    penalty = max(float(payload["penalty"]) for payload in payloads)
    # One target without a calibrated ban bans outright; otherwise the strongest calibrated ban holds for all.
    bans = [payload.get("ban") for payload in payloads]
    ban = None if any(b is None for b in bans) else max(float(b) for b in bans)
    return PhraseGuardHook(phrases, penalty, vocabulary, prompt_ids, output_ids, ban)
