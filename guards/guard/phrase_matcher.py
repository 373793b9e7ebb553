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
TABLES_KEPT = 256  # phrase sets whose tables a worker keeps (one per combination of hit targets in use)


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
        self._tables = lru_cache(maxsize=TABLES_KEPT)(lambda phrases: PhraseTable(phrases, self))

    def table(self, phrases: Sequence[str]) -> PhraseTable:
        """The shared table of these (lower-cased, distinct) phrases; the most recent TABLES_KEPT are kept."""
        return self._tables(tuple(phrases))

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
        self._banned: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def feed(self, state: int, text: str) -> int:
        for char in text:
            while state and char not in self.goto[state]:
                state = self.fail[state]
            state = self.goto[state].get(char, 0)
        return state

    def banned(self, state: int, vocab: int, device: torch.device) -> torch.Tensor:
        """Tokens that would complete a phrase in this state."""
        key = (state, vocab, device)
        if key not in self._banned:
            ids: set[int] = set()
            node = state
            while node:
                for remainder in self.remainders[node]:
                    ids.update(self.vocabulary.starting_with(remainder))
                node = self.fail[node]
            self._banned[key] = _index([i for i in ids if i < vocab], device)
        return self._banned[key]


class PhraseTable:
    """Everything about one set of phrases that does not depend on a request: the automaton, the tokens that contain
    a whole phrase, those that begin one, and (lazily, per automaton state) those that would complete one.

    Requests about the same targets ban the same phrases, so tables are shared (``Vocabulary.table``): a request's
    hook then costs one automaton state, and each decoding step only looks its tensors up.
    """

    def __init__(self, phrases: Sequence[str], vocabulary: Vocabulary) -> None:
        self.phrases = tuple(phrases)
        self.automaton = PhraseAutomaton(self.phrases, vocabulary)
        self.longest = max((len(p) for p in self.phrases), default=0)
        always = {i for p in self.phrases for i in vocabulary.containing(p)}
        self._always_ids = sorted(always)
        self._starter_ids = sorted({i for p in self.phrases for i in vocabulary.starting_phrase(p)} - always)
        self._tensors: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    def always(self, vocab: int, device: torch.device) -> torch.Tensor:
        return self._cached("always", self._always_ids, vocab, device)

    def starters(self, vocab: int, device: torch.device) -> torch.Tensor:
        return self._cached("starters", self._starter_ids, vocab, device)

    def _cached(self, name: str, ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
        key = (name, vocab, device)
        if key not in self._tensors:
            self._tensors[key] = _index([i for i in ids if i < vocab], device)
        return self._tensors[key]


class PhraseGuardHook:
    """One row's GUARD state; ``apply`` is called once per decoding step with that row's logits, or ``apply_rows``
    once per step for every GUARD row of the batch.

    Each step a row's banned tokens (those containing a phrase, and those completing one from the row's automaton
    state) lose ``ban`` (−inf when None) and the tokens beginning a phrase lose ``penalty``. The cost of a step is
    one ``index_put_`` over all rows: the index tensors are the tables', built once per state.
    """

    def __init__(self, phrases: Sequence[str], penalty: float, vocabulary: Vocabulary,
                 prompt_ids: Sequence[int] | None, output_ids: list[int], ban: float | None = None) -> None:
        self.vocabulary = vocabulary
        self.table = vocabulary.table([p.lower() for p in dict.fromkeys(phrases) if p.strip()])
        self.penalty = penalty
        self.ban = ban  # None: banned tokens get -inf
        self.output_ids = output_ids  # vLLM's live list: it grows by one token per step
        self.seen = 0
        longest = self.table.longest
        strings = vocabulary.strings
        tail = "".join(strings[t] for t in (prompt_ids or ())[-longest:] if 0 <= t < len(strings))
        self.state = self.table.automaton.feed(0, tail[-longest:] if longest else "")

    def apply(self, logits_row: torch.Tensor) -> None:
        PhraseGuardHook.apply_rows(logits_row.unsqueeze(0), [(0, self)])

    @staticmethod
    def apply_rows(logits: torch.Tensor, rows: Sequence[tuple[int, PhraseGuardHook]]) -> None:
        """Every listed row's step at once: each hook reads its new tokens, then one accumulated ``index_put_``
        subtracts each row's ban and penalty from its tokens (−inf for an outright ban)."""
        vocab, device = logits.shape[-1], logits.device
        ids: list[torch.Tensor] = []
        owners: list[int] = []
        amounts: list[float] = []
        for row, hook in rows:
            hook._advance()
            table = hook.table
            ban = float("inf") if hook.ban is None else float(hook.ban)
            parts = [(table.always(vocab, device), ban)]
            if hook.state:
                parts.append((table.automaton.banned(hook.state, vocab, device), ban))
            if hook.penalty:
                parts.append((table.starters(vocab, device), float(hook.penalty)))
            for part, amount in parts:
                if len(part):
                    ids.append(part)
                    owners.append(row)
                    amounts.append(amount)
        if not ids:
            return
        lengths = torch.tensor([len(part) for part in ids], device=device)
        row_index = torch.repeat_interleave(torch.tensor(owners, device=device), lengths)
        values = torch.repeat_interleave(torch.tensor(amounts, dtype=logits.dtype, device=device), lengths)
        logits.index_put_((row_index, torch.cat(ids)), -values, accumulate=True)

    def _advance(self) -> None:
        """Feed the automaton the tokens generated since the last step."""
        new = self.output_ids[self.seen:]
        self.seen = len(self.output_ids)
        if new:
            strings = self.vocabulary.strings
            self.state = self.table.automaton.feed(self.state,
                                                   "".join(strings[t] for t in new if 0 <= t < len(strings)))


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
