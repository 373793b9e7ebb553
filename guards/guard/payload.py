"""What GUARD sends to the engine: a reference to a phrase artifact, never the phrases themselves.

vLLM logs a request's ``SamplingParams`` (``extra_args`` included) when its engine fails, and msgpack carries them to
the engine core on every request, so forget text in ``extra_args`` would land in operators' logs. GUARD's payload in
``extra_args["lethe"]["guard"]`` is therefore one reference per hit target::

    {"artifact": "/…/artifacts/<sha256>",   # a content-addressed phrase artifact (its phrases.json)
     "items": [4, 0, 7],                     # forget items, best match first (only those that lend phrases)
     "limit": 64,                            # how many phrases in all
     "penalty": 5.0,                         # soft penalty on tokens that begin a phrase
     "ban": 12.5}                            # optional: a calibrated finite ban (absent: banned tokens get -inf)

and the engine process (``phrase_matcher.guard_row_hook``) loads the artifact once per path (content-addressed, so
it never changes) and rebuilds exactly the phrases the planner chose with ``ranked_phrases``. The planner's GUARD
artifact and the interim protection's artifact (``interim.py``) share this one shape.

``validate_guard_section`` checks the shape in the front end (vLLM turns its ``ValueError`` into a 400 before the
request reaches the engine); anything it lets through that still cannot be resolved (a missing file, an index out of
range) fails closed in the engine (``guards.processor.FailClosedHook``), never crashes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

GUARD_KEY = "guard"
PHRASES_FILE = "phrases.json"
TOP_ITEMS = 3
MAX_LIMIT = 4096  # GuardOptions.max_phrases' bound
MAX_ITEMS = 1 << 16  # forget items one payload may name
MAX_INDEX = (1 << 31) - 1
PAYLOAD_KEYS = frozenset({"artifact", "items", "limit", "penalty"})
OPTIONAL_KEYS = frozenset({"ban"})
_DIGEST = re.compile(r"[0-9a-f]{64}")

ItemPhrases = dict[str, list[str]]
"""One forget item's forbidden phrases: {"key": its answer's key phrases, "content": every content word of it}."""


@dataclass(frozen=True)
class PhraseTable:
    """The phrases of one artifact: the aliases' (always banned) and each forget item's."""

    aliases: tuple[str, ...]
    items: tuple[ItemPhrases, ...]

    def ranked(self, order: Sequence[int], limit: int) -> list[str]:
        return ranked_phrases(self.aliases, self.items, order, limit)

    @property
    def digest(self) -> str:
        """Names the table's contents: a calibrated ban holds only for the phrases it was calibrated on."""
        text = json.dumps({"aliases": list(self.aliases), "items": [dict(i) for i in self.items]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def write_phrase_table(directory: Path, aliases: Sequence[str], items: Sequence[ItemPhrases]) -> None:
    """Store a phrase table as ``phrases.json`` in an artifact being staged."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PHRASES_FILE).write_text(json.dumps({"aliases": list(aliases), "items": [dict(i) for i in items]}))


def read_phrase_table(directory: Path) -> PhraseTable:
    data = json.loads((directory / PHRASES_FILE).read_text())
    items = tuple({"key": [str(p) for p in item["key"]], "content": [str(p) for p in item["content"]]}
                  for item in data["items"])
    return PhraseTable(aliases=tuple(str(alias) for alias in data["aliases"]), items=items)


@lru_cache(maxsize=256)
def load_phrase_table(artifact: str) -> PhraseTable:
    """A phrase artifact by path, read once per process: content-addressed, so a path's contents never change."""
    return read_phrase_table(Path(artifact))


def _ranked(aliases: Sequence[str], items: Sequence[ItemPhrases], order: Sequence[int],
            limit: int) -> tuple[list[str], int]:
    """``ranked_phrases`` and how many leading entries of ``order`` it drew phrases from."""
    phrases: list[str] = []
    seen: set[str] = set()

    def add(phrase: str) -> bool:
        """Add one phrase unless seen; True once the limit is reached."""
        key = phrase.lower()
        if key not in seen:
            seen.add(key)
            phrases.append(phrase)
        return len(phrases) >= limit

    for alias in aliases:
        if add(alias):
            return phrases, 0
    for rank, index in enumerate(order):
        item = items[index]
        for phrase in (*item["key"], *item["content"]) if rank < TOP_ITEMS else item["key"]:
            if add(phrase):
                return phrases, rank + 1
    return phrases, len(order)


def ranked_phrases(aliases: Sequence[str], items: Sequence[ItemPhrases], order: Sequence[int], limit: int) -> list[str]:
    """Aliases, then every phrase of the ``TOP_ITEMS`` first items of ``order`` (key phrases and content words), then
    the key phrases of the rest; case-insensitively unique, at most ``limit``."""
    return _ranked(aliases, items, order, limit)[0]


def guard_payload(artifact: Path, table: PhraseTable, order: Sequence[int], limit: int,
                  penalty: float, ban: float | None = None) -> dict[str, Any]:
    """The reference the engine resolves to ``table.ranked(order, limit)``; ``order`` is cut to the items that lend
    phrases, so the payload stays small whatever the number of forget items. ``ban``: a finite penalty for the
    banned tokens instead of -inf (GUARD's calibration)."""
    _, used = _ranked(table.aliases, table.items, order, limit)
    payload = {"artifact": str(artifact.absolute()), "items": [int(i) for i in order[:used]], "limit": int(limit),
               "penalty": float(penalty)}
    return payload if ban is None else {**payload, "ban": float(ban)}


def resolve_phrases(payload: Mapping[str, Any]) -> list[str]:
    """The phrases a payload names (engine side; raises if its artifact cannot be read or an index is out of range)."""
    return load_phrase_table(payload["artifact"]).ranked(payload["items"], payload["limit"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_guard_section(section: Mapping[str, Any]) -> None:
    """Front-end check (a 400, never an engine crash): a list of references of exactly the shape above; phrase text
    is refused outright."""
    payloads = section.get(GUARD_KEY)
    if payloads is None:
        return
    if not isinstance(payloads, list):
        raise ValueError("lethe.guard must be a list")
    for payload in payloads:
        if not isinstance(payload, Mapping) or not PAYLOAD_KEYS <= set(payload) <= PAYLOAD_KEYS | OPTIONAL_KEYS:
            raise ValueError(f"lethe.guard entries must have the keys {sorted(PAYLOAD_KEYS)} "
                             f"(and optionally {sorted(OPTIONAL_KEYS)})")
        artifact = payload["artifact"]
        if not isinstance(artifact, str) or not Path(artifact).is_absolute() or not _DIGEST.fullmatch(
                Path(artifact).name):
            raise ValueError("lethe.guard artifact must be the absolute path of a content-addressed artifact")
        items = payload["items"]
        if not isinstance(items, list) or len(items) > MAX_ITEMS or not all(
                _is_int(i) and 0 <= i <= MAX_INDEX for i in items):
            raise ValueError("lethe.guard items must be a list of forget-item indices")
        if not _is_int(payload["limit"]) or not 1 <= payload["limit"] <= MAX_LIMIT:
            raise ValueError(f"lethe.guard limit must be an integer in [1, {MAX_LIMIT}]")
        for key in ("penalty", *OPTIONAL_KEYS & set(payload)):
            value = payload[key]
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"lethe.guard {key} must be a non-negative finite number")
