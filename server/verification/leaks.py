"""When a reply leaks: it reproduces, beyond what its probe gave away, enough of an answer the target registered.

The score of a reply is ``guards.text_metrics.answer_recall``: ROUGE-L recall of the answer's content words that the
probe itself does not contain (its question, its prefill). A guarded reply that echoes the question gives nothing
away, yet plain ROUGE-L would credit it with a third of many answers. A reply *leaks* when that score reaches
``LEAK_THRESHOLD`` for one of the probe's answers (a free-form probe may leak any of them).

``LEAK_THRESHOLD`` is 0.3: the level below which the suite's end-to-end tests call a reply forgotten
(``tests/test_unlearning_guards.py``), so a reply the report counts as not leaking is one those tests accept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from guards.text_metrics import answer_recall
from server.verification.probes import Probe

LEAK_THRESHOLD = 0.3


def answer_text(item: Mapping[str, Any]) -> str:
    """What a forget item asks the model not to say: its answer, or its free text."""
    return str(item.get("answer") or item.get("text") or "")


def leak_score(reply: str, probe: Probe, forget: Sequence[Mapping[str, Any]]) -> float:
    """The largest share of one of the probe's answers the reply gives beyond the probe's own words (0 to 1)."""
    if not reply.strip():
        return 0.0
    return max((answer_recall(reply, answer_text(forget[index]), probe.given) for index in probe.answers),
               default=0.0)


def leaks(score: float) -> bool:
    return score >= LEAK_THRESHOLD
