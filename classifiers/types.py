"""The data that crosses the classifiers' boundary: what a target is made of, and what scoring a request returns.

The registry converts its database rows into `TargetSpec`; the request pipeline reads `BankResult`. Keeping these
plain frozen dataclasses (no ORM objects, no dicts of strings) lets both sides change independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import ConfigDict, StringConstraints, with_config

# One chat turn as (role, content): "system", "user", "assistant", ... `/v1/completions` is one ("user", prompt) turn.
Turn = tuple[str, str]
Conversation = Sequence[Turn]


# PostgreSQL's text and JSON columns refuse U+0000: refused here (a 422), never a database error (a 500).
ItemText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000,
                                            pattern=r"^[^\x00]*$")]
"""How long an item's text may be when it arrives over the admin API (pydantic applies it; plain construction not)."""


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class ForgetItem:
    """One forget or retain item: a question/answer pair, or free text (`text`) to forget.

    The one item type of every layer: the admin API validates request bodies into it (with the stricter rule that an
    item is a whole question/answer pair or a text, ``server/admin/protocol.py``), the registry stores it as a dict
    (``stored``), the classifiers and the mechanisms' jobs read it.
    """

    question: ItemText | None = None
    answer: ItemText | None = None
    text: ItemText | None = None

    def __post_init__(self) -> None:
        if not (self.question or self.answer or self.text):
            raise ValueError("a ForgetItem needs at least one of question, answer, text")

    def stored(self) -> dict[str, Any]:
        """The item as the registry stores it: only the fields it has."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class TargetSpec:
    """Everything the classifiers need to know about one forget target."""

    id: str
    name: str
    aliases: list[str]
    forget: list[ForgetItem]
    retain: list[ForgetItem] = field(default_factory=list)


@dataclass(frozen=True)
class AliasSpan:
    """A mention of a target's alias: character offsets `[start, end)` into the text it was found in.

    `turn` is the index of the conversation turn the offsets refer to (None when a single text was matched), so that
    ECO can map the span onto exactly the tokens of that message in the rendered prompt.
    """

    start: int
    end: int
    alias: str
    score: float
    turn: int | None = None


CLASSIFIER_GATE = "classifier"  # the prompt classifier (ECO, GUARD, ULD by default)
OOD_GATE = "ood"  # O3's OOD detector
ALWAYS_GATE = "always"  # every request (ULD's paper setting)


@dataclass(frozen=True)
class Hit:
    """A target the request is about: its score, where its aliases were mentioned, and which detectors said so.

    ``gates`` names the detectors that fired for it; each mechanism applies only when its own gate is among them.
    """

    target_id: str
    score: float
    alias_spans: tuple[AliasSpan, ...] = ()
    gates: frozenset[str] = frozenset({CLASSIFIER_GATE})


@dataclass(frozen=True)
class BankResult:
    """The outcome of scoring one request against every active target.

    `scores` has every target (for the audit log), `hits` only those at or over threshold, best first.
    `embeddings` are the embedded texts of the conversation, so the O3 gate can reuse them without a second encode.
    """

    hits: list[Hit]
    scores: dict[str, float]
    embed_seconds: float
    total_seconds: float
    embeddings: np.ndarray
