"""Calibrating a mechanism's strength against the served model's behaviour on an entity it never saw (issue 16).

"Forgotten" should read like "never learned": the protected model should find a target's true answers about as likely
as it finds true-sounding answers about a person it never heard of, and say about as much of them. Too weak and the
answers leak; too strong and the answers become *less* likely than a stranger's would be, which a reader of replies or
logprobs notices (that over-forgetting is what TOFU's Forget Quality and Lethe's membership distinguisher measure).

The reference exists in production, made from the registration alone (``guards.invented``): the target's forget
questions and answers with every registered name swapped for an invented one. On that invented entity the plain
served model gives

- ``reference_loss``: the mean per-token NLL of the swapped answers after the swapped questions (how likely a true
  answer is about someone unknown), and
- ``reference_recall``: the mean ROUGE-L recall of another item's swapped answer in its greedy replies to the swapped
  questions (how much of an answer a reply shares by chance: the form, the common words; ``reference_of`` says why
  not the reply's own answer).

``calibrate_strength`` then searches a mechanism's one knob (ULD's α, GUARD's ban penalty), whose loss on the real
questions grows with it: first the strength whose loss matches ``reference_loss`` (bisection), then, if the greedy
replies at that strength still say more than ``reference_recall + RECALL_MARGIN`` of the real answers, the weakest
stronger one that does not (no leak comes first). Only registered data and invented names are used: never another
author, a twin model or TOFU's perturbed answers (those are the evaluation's).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guards.invented import InventedEntity, invent_entity
from guards.probe import HookFactory, ModelProbe
from guards.text_metrics import rouge_l_recall

RECALL_MARGIN = 0.05  # as ECO's goal: ROUGE-L over a dozen replies moves by a few hundredths from noise alone
CALIBRATION_QUESTIONS = 20
REPLY_TOKENS = 60
LOSS_STEPS = 7
LEAK_STEPS = 5


@dataclass(frozen=True)
class QaPair:
    question: str
    answer: str


@dataclass(frozen=True)
class Reference:
    """The plain served model on the invented stand-in of a target's questions."""

    entity: InventedEntity
    pairs: tuple[QaPair, ...]  # the real (registered) questions and answers, the calibration sample
    loss: float
    recall: float

    def figures(self) -> dict[str, Any]:
        return {"reference_loss": round(self.loss, 4), "reference_recall": round(self.recall, 4),
                "questions": len(self.pairs)}


@dataclass
class Calibration:
    """The chosen strength and how it was found (every tried point, for the target's state and the report).

    ``limited_by``: ``reference`` (the loss matches the never-seen reference), ``leak`` (raised above that until the
    replies stopped leaking), ``range`` (even the strongest setting leaves the answers likelier than the reference:
    the strongest is kept), ``unbounded`` (no setting in range stops the leak: ``strength`` is None and the mechanism
    keeps its strongest form)."""

    strength: float | None
    loss: float
    recall: float
    limited_by: str
    curve: list[list[float]] = field(default_factory=list)  # [strength, loss] per loss evaluation
    leak_curve: list[list[float]] = field(default_factory=list)  # [strength, recall] per leak evaluation

    def figures(self) -> dict[str, Any]:
        return {"loss": round(self.loss, 4), "recall": round(self.recall, 4), "limited_by": self.limited_by,
                "curve": self.curve, "leak_curve": self.leak_curve}


def calibration_sample(forget: Sequence[tuple[str, str]], seed: str, count: int = CALIBRATION_QUESTIONS
                       ) -> tuple[QaPair, ...]:
    """Up to ``count`` of the target's question/answer items, the same ones for the same target."""
    pairs = [QaPair(q, a) for q, a in forget if q and a]
    if not pairs:
        raise ValueError("calibration needs question/answer forget items")
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), min(count, len(pairs))))
    return tuple(pairs[i] for i in chosen)


def entity_names(name: str, aliases: Sequence[str]) -> list[str]:
    """The names the stand-in swaps: the registered aliases (the target's ``name`` is often an operator's label such
    as "ticket-4711"), the name itself only when there are none."""
    return [alias for alias in aliases if alias.strip()] or [name]


def measure_reference(probe: ModelProbe, pairs: Sequence[QaPair], names: Sequence[str], seed: int,
                      max_tokens: int = REPLY_TOKENS) -> Reference:
    """The plain model's loss and recall on the invented stand-in of ``pairs`` (names: the target's name and
    aliases; see ``reference_of`` for which items count)."""
    entity = invent_entity(names, seed)
    swapped = [QaPair(entity.swap(p.question), entity.swap(p.answer)) for p in pairs]
    losses = [probe.mean_loss(p.question, p.answer) for p in swapped]
    replies = [probe.greedy(p.question, max_tokens) for p in swapped]
    return reference_of(entity, pairs, swapped, losses, replies)


def reference_of(entity: InventedEntity, pairs: Sequence[QaPair], swapped: Sequence[QaPair], losses: Sequence[float],
                 replies: Sequence[str]) -> Reference:
    """The reference from the plain model's ``losses`` of the swapped answers and its ``replies`` to the swapped
    questions.

    - loss: over the items whose question names the target (swapping changed it). A question that names nobody
      ("Who wrote 'Promise by the Seine'?") is the same question after the swap, and a model that memorised the
      answer still finds it likely: it says nothing about a stranger. (All items if none names the target.)
    - recall: each reply scored against the *next* item's swapped answer: the overlap an answer's form and common
      words give by chance, without its facts. Scored against its own answer, a model that maps a question's shape
      to the memorised answer whatever the name (a small, overfitted one does) would set the bar at the leak itself.
    """
    named = [loss for loss, real, fake in zip(losses, pairs, swapped, strict=True) if real.question != fake.question]
    recall = chance_recall(replies, [p.answer for p in swapped])
    return Reference(entity, tuple(pairs), statistics.fmean(named or losses), recall)


def chance_recall(replies: Sequence[str], answers: Sequence[str]) -> float:
    """Mean ROUGE-L recall of each reply against the next item's answer (``reference_of``; ECO's goal too)."""
    return statistics.fmean(rouge_l_recall(reply, answers[(i + 1) % len(answers)]) for i, reply in enumerate(replies))


def protected_loss(probe: ModelProbe, pairs: Sequence[QaPair], hooks_for: Callable[[int], HookFactory]) -> float:
    """Mean per-token NLL of the real answers after the real questions, item ``i`` under ``hooks_for(i)``."""
    return statistics.fmean(probe.mean_loss(p.question, p.answer, hooks_for(i)) for i, p in enumerate(pairs))


def protected_recall(probe: ModelProbe, pairs: Sequence[QaPair], hooks_for: Callable[[int], HookFactory],
                     max_tokens: int = REPLY_TOKENS) -> float:
    """Mean ROUGE-L recall of the real answers in the protected greedy replies to the real questions."""
    return statistics.fmean(rouge_l_recall(probe.greedy(p.question, max_tokens, hooks_for(i)), p.answer)
                            for i, p in enumerate(pairs))


def calibrate_strength(loss_at: Callable[[float], float], recall_at: Callable[[float], float], reference: Reference,
                       low: float, high: float, progress: Callable[[str], None] = lambda message: None,
                       loss_steps: int = LOSS_STEPS, leak_steps: int = LEAK_STEPS) -> Calibration:
    """The strength in ``[low, high]`` whose loss matches the reference's, raised until the replies stop leaking.

    ``loss_at`` must grow and ``recall_at`` fall with the strength (more forgetting); both are measured on the real
    questions with the mechanism at that strength. Each is evaluated at most once per strength.
    """
    losses: dict[float, float] = {}
    recalls: dict[float, float] = {}

    def loss(strength: float) -> float:
        if strength not in losses:
            losses[strength] = loss_at(strength)
            progress(f"strength {strength:.4g}: answer loss {losses[strength]:.3f} (never-seen {reference.loss:.3f})")
        return losses[strength]

    def recall(strength: float) -> float:
        if strength not in recalls:
            recalls[strength] = recall_at(strength)
            progress(f"strength {strength:.4g}: reply recall {recalls[strength]:.3f} "
                     f"(never-seen {reference.recall:.3f})")
        return recalls[strength]

    def result(strength: float | None, at: float, limited_by: str) -> Calibration:
        return Calibration(strength, loss(at), recall(at), limited_by,
                           [[round(s, 4), round(v, 4)] for s, v in losses.items()],
                           [[round(s, 4), round(v, 4)] for s, v in recalls.items()])

    goal_recall = reference.recall + RECALL_MARGIN
    if loss(high) <= reference.loss:  # even the strongest setting leaves the answers likelier than a stranger's
        chosen, limited_by = high, "range"
    else:
        lo, hi = low, high
        for _ in range(loss_steps):
            middle = (lo + hi) / 2
            lo, hi = (middle, hi) if loss(middle) < reference.loss else (lo, middle)
        chosen, limited_by = hi, "reference"
    if recall(chosen) <= goal_recall:
        return result(chosen, chosen, limited_by)
    if recall(high) > goal_recall:
        return result(None, high, "unbounded")
    lo, hi = chosen, high
    for _ in range(leak_steps):
        middle = (lo + hi) / 2
        lo, hi = (middle, hi) if recall(middle) > goal_recall else (lo, middle)
    return result(hi, hi, "leak")
