"""Calibrating a mechanism's strength against the served model's behaviour on an entity it never saw (issue 16).

"Forgotten" should read like "never learned": the protected model should prefer a target's true answers over wrong
but plausible ones about as much as it prefers a stranger's true answers over wrong ones (not at all, having no way to
tell them apart), and say about as much of them. Too weak and the answers leak; too strong and the true answer
becomes *less* likely than a wrong one, which a reader of replies or logprobs notices (that over-forgetting is what
TOFU's truth ratio and Forget Quality, and Lethe's membership distinguisher, measure).

The reference exists in production, made from the registration alone (``guards.invented``): the target's forget
questions and answers with every registered name swapped for an invented one. Two stand-ins are drawn. The second
one's greedy replies, with its names mapped back, are *wrong answers* in the served model's own words (what it says
about somebody it never heard of: "generic predictions"); on the first stand-in the plain served model gives

- ``reference_gap``: the mean, over the questions that name the target, of the per-token NLL of the true answer
  (names swapped, facts invented: ``guards.invented.with_invented_facts``, since a memorising model finds the
  target's own facts likely about anybody) minus that of the wrong one: how much likelier a stranger's true answer
  is than a made-up one (a question that names nobody is the same question after the swap, and says nothing about
  a stranger);
- ``reference_recall``: the mean ROUGE-L recall its replies reach by chance, each scored against another item's
  swapped answer (``chance_recall`` says why not its own).

- ``reference_fluency``: the median share of real words in those replies (``guards.fluency``: English words and the
  registration's own).

``calibrate_strength`` then searches a mechanism's one knob (ULD's α, GUARD's ban penalty), whose gap on the real
questions grows with it: first the strength whose gap matches ``reference_gap`` (bisection); lowered to the strongest
one whose greedy replies on the real questions are still language (word share at most ``FLUENCY_MARGIN`` below the
reference's: a subtraction strong enough to match the gap on a model that memorised its answers verbatim turns them
into token soup, which no model that never saw the target writes); then, if the replies at that strength say more of
the real answers than both the stranger's chance level and the mechanism at its strongest setting do
(+ ``RECALL_MARGIN``), raised to the weakest stronger one that does not (no leak comes first, fluency second). Only
registered data and invented names are used: never another author, a twin model or TOFU's perturbed answers (those
are the evaluation's)."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guards.fluency import median_word_share, vocabulary_with
from guards.invented import InventedEntity, invent_entity, with_invented_facts
from guards.probe import HookFactory, ModelProbe
from guards.text_metrics import rouge_l_recall

RECALL_MARGIN = 0.05  # as ECO's goal: ROUGE-L over a dozen replies moves by a few hundredths from noise alone
# Plain replies score 1.0, soup well under 0.8; on the tiny demo model ULD's α 0.8 scores 0.91-0.94 and α 1.1 0.79-0.88
# (its replies keep some broken words at any α that forgets): the end-to-end tests' bar of 0.9, relative.
FLUENCY_MARGIN = 0.1
CALIBRATION_QUESTIONS = 20
REPLY_TOKENS = 60
GAP_STEPS = 7
LEAK_STEPS = 5
FLUENCY_STEPS = 5


@dataclass(frozen=True)
class QaPair:
    question: str
    answer: str


@dataclass(frozen=True)
class Reference:
    """The plain served model on the invented stand-ins of a target's questions."""

    entity: InventedEntity
    pairs: tuple[QaPair, ...]  # the real (registered) questions and answers, the calibration sample
    wrong: tuple[str, ...]  # per pair, a wrong answer in the model's own words, with the target's names ("": none)
    gap_items: tuple[int, ...]  # the pairs the gap is measured on
    gap: float
    recall: float
    fluency: float = 1.0
    vocabulary: frozenset[str] = frozenset()  # the words replies are judged by (``guards.fluency``)

    def figures(self) -> dict[str, Any]:
        return {"reference_gap": round(self.gap, 4), "reference_recall": round(self.recall, 4),
                "reference_fluency": round(self.fluency, 4), "questions": len(self.pairs),
                "gap_questions": len(self.gap_items)}


@dataclass
class Calibration:
    """The chosen strength and how it was found (every tried point, for the target's state and the report).

    ``limited_by``: ``reference`` (the gap matches the never-seen reference), ``fluency`` (lowered below that until
    the replies were language again), ``leak`` (raised above either until the replies leaked no more than at the
    strongest setting), ``range`` (even the strongest setting leaves the true answers likelier, against wrong ones,
    than the reference: the strongest is kept, unless fluency lowers it)."""

    strength: float
    gap: float
    recall: float
    limited_by: str
    curve: list[list[float]] = field(default_factory=list)  # [strength, gap] per gap evaluation
    leak_curve: list[list[float]] = field(default_factory=list)  # [strength, recall] per leak evaluation
    fluency: float | None = None  # the replies' word share at the chosen strength, when measured
    fluency_curve: list[list[float]] = field(default_factory=list)  # [strength, word share] per fluency evaluation

    def figures(self) -> dict[str, Any]:
        fluency = {} if self.fluency is None else {"fluency": round(self.fluency, 4),
                                                   "fluency_curve": self.fluency_curve}
        return {"gap": round(self.gap, 4), "recall": round(self.recall, 4), "limited_by": self.limited_by,
                "curve": self.curve, "leak_curve": self.leak_curve, **fluency}


def sample_key(seed: int, names: Sequence[str]) -> str:
    """What seeds a calibration's choice of questions: the registration's names and its mechanism's ``seed`` option,
    so that the same registration calibrates on the same questions every time (a retried job, a re-registration) and
    another seed on others."""
    return "\n".join([str(seed), *names])


def calibration_sample(forget: Sequence[tuple[str, str]], key: str, count: int = CALIBRATION_QUESTIONS
                       ) -> tuple[QaPair, ...]:
    """Up to ``count`` of the target's question/answer items, the same ones for the same ``key`` (``sample_key``)."""
    pairs = [QaPair(q, a) for q, a in forget if q and a]
    if not pairs:
        raise ValueError("calibration needs question/answer forget items")
    chosen = sorted(random.Random(key).sample(range(len(pairs)), min(count, len(pairs))))
    return tuple(pairs[i] for i in chosen)


def stand_ins(names: Sequence[str], seed: int) -> tuple[InventedEntity, InventedEntity]:
    """The two invented stand-ins of a registration with ``seed``: the never-seen entity the reference is measured
    on, and the one whose replies are its wrong answers. No two seeds share a stand-in."""
    return invent_entity(names, 2 * seed), invent_entity(names, 2 * seed + 1)


def entity_names(name: str, aliases: Sequence[str]) -> list[str]:
    """The names the stand-in swaps: the registered aliases (the target's ``name`` is often an operator's label such
    as "ticket-4711"), the name itself only when there are none."""
    return [alias for alias in aliases if alias.strip()] or [name]


def measure_reference(probe: ModelProbe, pairs: Sequence[QaPair], names: Sequence[str], seed: int,
                      max_tokens: int = REPLY_TOKENS) -> Reference:
    """The plain model's gap and chance recall on the invented stand-ins of ``pairs`` (names: the target's names)."""
    entity, other = stand_ins(names, seed)
    other_replies = probe.greedy_many([other.swap(p.question) for p in pairs], max_tokens)
    wrong = tuple(other.restore(reply) for reply in other_replies)  # about the target, in the model's own words
    gap_items = tuple(i for i, p in enumerate(pairs) if entity.swap(p.question) != p.question and wrong[i].strip())
    if not gap_items:  # no question names the target: the gap over every item that has a wrong answer
        gap_items = tuple(i for i in range(len(pairs)) if wrong[i].strip())
    if not gap_items:
        raise ValueError("the served model gave no reply to any invented stand-in question")
    facts = random.Random(f"{sample_key(seed, names)}\ninvented facts")
    true = [entity.swap(with_invented_facts(p.answer, list(entity.parts), facts)) for p in pairs]
    gaps = [probe.mean_loss(entity.swap(pairs[i].question), true[i])
            - probe.mean_loss(entity.swap(pairs[i].question), entity.swap(wrong[i])) for i in gap_items]
    recall = chance_recall(other_replies, [other.swap(p.answer) for p in pairs])
    vocabulary = vocabulary_with([*names, *(text for p in pairs for text in (p.question, p.answer))])
    return Reference(entity, tuple(pairs), wrong, gap_items, statistics.fmean(gaps), recall,
                     median_word_share(wrong, vocabulary), vocabulary)


def chance_recall(replies: Sequence[str], answers: Sequence[str]) -> float:
    """Mean ROUGE-L recall of each reply against the next item's answer: the overlap an answer's form and common
    words give by chance, without its facts (ECO's goal too). Scored against its own answer, a model that maps a
    question's shape to the memorised answer whatever the name (a small, overfitted one does) would set the bar at
    the leak itself."""
    return statistics.fmean(rouge_l_recall(reply, answers[(i + 1) % len(answers)]) for i, reply in enumerate(replies))


def protected_gap(probe: ModelProbe, reference: Reference, hooks_for: Callable[[int], HookFactory]) -> float:
    """The gap on the real questions, pair ``i`` under ``hooks_for(i)``: the true answer's per-token NLL minus the
    wrong answer's, averaged over the reference's gap items."""
    pairs, wrong = reference.pairs, reference.wrong
    return statistics.fmean(probe.mean_loss(pairs[i].question, pairs[i].answer, hooks_for(i))
                            - probe.mean_loss(pairs[i].question, wrong[i], hooks_for(i)) for i in reference.gap_items)


class ProtectedReplies:
    """The protected greedy replies to the real questions, decoded once per strength: the leak bar (``recall``) and
    the fluency bar (``fluency``) read the same replies. ``hooks_at(strength)(i)`` gives pair ``i``'s hooks."""

    def __init__(self, probe: ModelProbe, reference: Reference,
                 hooks_at: Callable[[float], Callable[[int], HookFactory]], max_tokens: int = REPLY_TOKENS) -> None:
        self._probe, self._reference, self._hooks_at, self._max_tokens = probe, reference, hooks_at, max_tokens
        self._replies: dict[float, list[str]] = {}

    def at(self, strength: float) -> list[str]:
        if strength not in self._replies:
            hooks_for = self._hooks_at(strength)
            pairs = self._reference.pairs
            self._replies[strength] = self._probe.greedy_many([p.question for p in pairs], self._max_tokens,
                                                              [hooks_for(i) for i in range(len(pairs))])
        return self._replies[strength]

    def recall(self, strength: float) -> float:
        """Mean ROUGE-L recall of the real answers in the replies."""
        return statistics.fmean(rouge_l_recall(reply, pair.answer)
                                for reply, pair in zip(self.at(strength), self._reference.pairs, strict=True))

    def fluency(self, strength: float) -> float:
        """Median share of real words in the replies (the reference's vocabulary)."""
        return median_word_share(self.at(strength), self._reference.vocabulary)


def calibrate_strength(gap_at: Callable[[float], float], recall_at: Callable[[float], float], reference: Reference,
                       low: float, high: float, progress: Callable[[str], None] = lambda message: None,
                       gap_steps: int = GAP_STEPS, leak_steps: int = LEAK_STEPS,
                       fluency_at: Callable[[float], float] | None = None,
                       fluency_steps: int = FLUENCY_STEPS) -> Calibration:
    """The strength in ``[low, high]`` whose gap matches the reference's, lowered while its replies are not language
    (with ``fluency_at``), then raised until the replies stop leaking.

    ``gap_at`` must grow and ``recall_at`` and ``fluency_at`` fall with the strength (more forgetting); all are
    measured on the real questions with the mechanism at that strength, and each at most once per strength. ``low``
    is taken to be fluent (no protection reads as the plain model).
    """
    gap, gaps = _memoised(gap_at, "true-minus-wrong NLL", reference.gap, progress)
    recall, recalls = _memoised(recall_at, "reply recall", reference.recall, progress)
    fluency, fluencies = _memoised(fluency_at or (lambda strength: 1.0), "word share", reference.fluency, progress)

    def result(strength: float, limited_by: str) -> Calibration:
        return Calibration(strength, gap(strength), recall(strength), limited_by,
                           [[round(s, 4), round(v, 4)] for s, v in gaps.items()],
                           [[round(s, 4), round(v, 4)] for s, v in recalls.items()],
                           None if fluency_at is None else fluency(strength),
                           [[round(s, 4), round(v, 4)] for s, v in fluencies.items()])

    # No leak comes first, judged against what the mechanism can do at all: its replies at the strongest setting
    # still share a template's words and the name the question gives (GUARD's at -inf or 40: 0.16 on the full demo
    # model, against a chance level of 0.09), so the bar is the higher of that and the stranger's chance level.
    goal_recall = max(reference.recall, recall(high)) + RECALL_MARGIN
    if gap(high) <= reference.gap:  # even the strongest setting leaves the true answers favoured over a stranger's
        chosen, limited_by = high, "range"
    else:
        lo, hi = low, high
        for _ in range(gap_steps):
            middle = (lo + hi) / 2
            lo, hi = (middle, hi) if gap(middle) < reference.gap else (lo, middle)
        chosen, limited_by = hi, "reference"
    fluent = reference.fluency - FLUENCY_MARGIN
    if fluency_at is not None and fluency(chosen) < fluent:
        lo, hi = low, chosen
        for _ in range(fluency_steps):
            middle = (lo + hi) / 2
            lo, hi = (middle, hi) if fluency(middle) >= fluent else (lo, middle)
        chosen, limited_by = lo, "fluency"
    if recall(chosen) <= goal_recall:
        return result(chosen, limited_by)
    lo, hi = chosen, high  # recall(high) meets the goal by construction
    for _ in range(leak_steps):
        middle = (lo + hi) / 2
        lo, hi = (middle, hi) if recall(middle) > goal_recall else (lo, middle)
    return result(hi, "leak")


def calibrate_hooks(probe: ModelProbe, reference: Reference, hooks_at: Callable[[float], Callable[[int], HookFactory]],
                    low: float, high: float, progress: Callable[[str], None] = lambda message: None) -> Calibration:
    """``calibrate_strength`` with the gap, the leak and the fluency all measured through ``probe`` under
    ``hooks_at(strength)`` (pair ``i``'s hooks: ``hooks_at(strength)(i)``): what GUARD's and ULD's calibrations run."""
    replies = ProtectedReplies(probe, reference, hooks_at)
    return calibrate_strength(lambda strength: protected_gap(probe, reference, hooks_at(strength)), replies.recall,
                              reference, low, high, progress, fluency_at=replies.fluency)


def _memoised(measure: Callable[[float], float], label: str, never_seen: float, progress: Callable[[str], None]
              ) -> tuple[Callable[[float], float], dict[float, float]]:
    """``measure`` evaluated at most once per strength (each is a batch of forward passes), reporting each value;
    also the values so far, in the order measured."""
    values: dict[float, float] = {}

    def at(strength: float) -> float:
        if strength not in values:
            values[strength] = measure(strength)
            progress(f"strength {strength:.4g}: {label} {values[strength]:.3f} (never-seen {never_seen:.3f})")
        return values[strength]

    return at, values
