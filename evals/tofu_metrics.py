"""TOFU's metrics (Maini et al., 2024) as pure functions of per-question losses, so any scorer can feed them.

Every loss here is a length-normalised NLL: the summed token NLL of an answer given its question, divided by the
number of answer tokens. TOFU logs exactly these (`avg_gt_loss`, `avg_paraphrased_loss`, `average_perturb_loss` in
`evaluate_util.py`), and its figures are functions of them alone, so the model side only has to produce the losses.

The definitions follow the code that produced the published numbers, locuslab/tofu @8c49eee: `aggregate_eval_stat.py`
(`get_model_utility`, `get_forget_quality`), `evaluate_util.py` (the loss normalisation) and
`config/eval_everything.yaml` (which answer each split scores). ULD's `uld/tofuutil/utils.py` @858608c, which gave the
reference Model Utility values in METHODS.md section 0, computes the same utility figures; open-unlearning's
`src/evals/metrics/memorization.py` states the same formulas in its own orientation (it reports false/true = 1/R). Where
the paper's prose and the code disagree, the code wins, because the reference numbers came from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import hmean, ks_2samp

from demo.tofu_data import load_split

TruthRatioSplit = Literal[
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
]
FORGET_SPLITS: frozenset[str] = frozenset({"forget01_perturbed", "forget05_perturbed", "forget10_perturbed"})
# The general-knowledge sets have one short answer per question and no paraphrase of it; their wrong answers are the
# other options, so TOFU scores the answer itself against them and normalises its probability over all options.
OPTION_SPLITS: frozenset[str] = frozenset({"real_authors_perturbed", "world_facts_perturbed"})


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float]) -> float:
    """R = exp(mean(perturbed losses) - paraphrased loss): how much likelier the true answer is than a wrong one.

    R > 1 means the model prefers the truth. The paper's formula averages the perturbed answers' per-token
    probabilities; TOFU's code (`aggregate_eval_stat.py`) averages their losses, i.e. takes the geometric mean of those
    probabilities. The code is followed. The paraphrased answer, not the trained one, is scored so that a model that
    memorised a wording but not the fact does not pass.
    """
    if not perturbed_losses:
        raise ValueError("a truth ratio needs at least one perturbed answer")
    return math.exp(float(np.mean(perturbed_losses)) - paraphrased_loss)


def forget_truth_ratio(truth_ratios: Sequence[float]) -> float:
    """Mean of min(R, 1/R): TOFU's "Truth Ratio" on a forget set.

    A model that never saw the forget authors has no reason to prefer the true answer or the wrong ones, so R near 1
    is the goal; the min folds a model that still knows (R > 1) and one that learnt to prefer wrong answers (R < 1)
    onto the same scale, where 1 is best.
    """
    ratios = np.asarray(truth_ratios, dtype=float)
    return float(np.mean(np.minimum(ratios, 1.0 / ratios)))


def utility_truth_ratio(truth_ratios: Sequence[float]) -> float:
    """Mean of max(0, 1 - 1/R): TOFU's "Truth Ratio" on retain, real_authors and world_facts.

    On knowledge the model should keep, preferring the truth is simply better; the clip at 0 keeps a set's figure in
    [0, 1) so it can enter Model Utility's harmonic mean.
    """
    ratios = np.asarray(truth_ratios, dtype=float)
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / ratios)))


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_model_truth_ratios: Sequence[float]) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test between the two models' forget-set truth ratios.

    High means the unlearned model's truth ratios are indistinguishable from those of a model never trained on the
    forget set. TOFU (`get_forget_quality`) and ULD feed R itself, not min(R, 1/R): the fold would make a model that
    prefers wrong answers look like one that knows. Feeding 1/R, as open-unlearning does, gives the same p-value, since
    the two-sided KS statistic ignores any strictly monotone transform applied to both samples.
    """
    return float(ks_2samp(unlearned_truth_ratios, retain_model_truth_ratios).pvalue)


def probability(answer_losses: Sequence[float]) -> float:
    """Mean of exp(-loss) of the true answer: TOFU's "Prob." on the forget and retain sets.

    The loss is per token, so this is the geometric-mean token probability P(a|q)^(1/|a|), which keeps long answers
    comparable with short ones. ULD's copy normalises over the perturbed answers on the forget set too; TOFU does not,
    and the forget figure is not part of Model Utility either way.
    """
    return float(np.mean(np.exp(-np.asarray(answer_losses, dtype=float))))


def probability_with_options(answer_losses: Sequence[float], perturbed_losses: Sequence[Sequence[float]]) -> float:
    """Mean of p(true) / (p(true) + sum p(perturbed)): TOFU's "Prob." on real_authors and world_facts.

    These questions have well-known answers any capable model finds likely, so the raw probability says little; how it
    compares with the wrong options does. Each p is exp(-per-token loss), as in `aggregate_eval_stat.py`.
    """
    if len(answer_losses) != len(perturbed_losses):
        raise ValueError(f"{len(answer_losses)} answer losses but {len(perturbed_losses)} perturbed-loss lists")
    true_probs = np.exp(-np.asarray(answer_losses, dtype=float))  # [questions]
    wrong_probs = np.exp(-np.asarray(perturbed_losses, dtype=float)).sum(axis=1)  # [questions, options] -> [questions]
    return float(np.mean(true_probs / (true_probs + wrong_probs)))


@dataclass(frozen=True)
class QuestionLosses:
    """Per-token losses one model assigns to the answers of one row of a `TruthRatioSplit`.

    `answer` is the gold answer's loss (for Probability); `base` is that of the answer the truth ratio scores (see
    `TruthRatioItem.base_answer`); `perturbed` are the wrong answers'.
    """

    answer: float
    base: float
    perturbed: tuple[float, ...]

    @property
    def truth_ratio(self) -> float:
        return truth_ratio(self.base, self.perturbed)


@dataclass(frozen=True)
class SetFigures:
    """TOFU's three figures for one evaluation set, each in [0, 1]."""

    probability: float
    rouge_l_recall: float
    truth_ratio: float


def set_figures(
    split: TruthRatioSplit, losses: Sequence[QuestionLosses], rouge_l_recalls: Sequence[float]
) -> SetFigures:
    """The three figures of one set, with the Probability and Truth Ratio variants TOFU uses for that kind of set."""
    if not losses or len(losses) != len(rouge_l_recalls):
        raise ValueError(f"{len(losses)} scored questions and {len(rouge_l_recalls)} ROUGE-L recalls for {split}")
    answer_losses = [q.answer for q in losses]
    if split in OPTION_SPLITS:
        prob = probability_with_options(answer_losses, [q.perturbed for q in losses])
    else:
        prob = probability(answer_losses)
    ratios = [q.truth_ratio for q in losses]
    truth = forget_truth_ratio(ratios) if split in FORGET_SPLITS else utility_truth_ratio(ratios)
    return SetFigures(probability=prob, rouge_l_recall=float(np.mean(rouge_l_recalls)), truth_ratio=truth)


def model_utility(retain: SetFigures, real_authors: SetFigures, world_facts: SetFigures) -> float:
    """Harmonic mean of {Probability, ROUGE-L recall, Truth Ratio} x {retain, real_authors, world_facts}: 9 figures.

    The harmonic mean lets no set or figure hide behind the others: a zero anywhere makes Model Utility 0, which is
    what scipy's `hmean` (used by TOFU and ULD) returns, and what ULD gets when a set is missing. The forget set is
    deliberately not an argument. Values outside [0, 1] or NaN mean a bug upstream and are refused rather than
    averaged into a plausible-looking number.
    """
    values = [
        figure
        for figures in (retain, real_authors, world_facts)
        for figure in (figures.probability, figures.rouge_l_recall, figures.truth_ratio)
    ]
    if not all(0.0 <= value <= 1.0 for value in values):
        raise ValueError(f"Model Utility's figures must lie in [0, 1], got {values}")
    return float(hmean(values))


@dataclass(frozen=True)
class TruthRatioItem:
    """One row of a `TruthRatioSplit`, with the answers its losses are taken on.

    `base_answer` is the answer the truth ratio scores against `perturbed_answers` (TOFU's `base_answer_key` in
    `config/eval_everything.yaml`): the paraphrased answer on the forget and retain sets, the answer itself on
    real_authors and world_facts, which have no paraphrase. Every loss is taken given `question`, never the paraphrased
    question.
    """

    question: str
    answer: str
    base_answer: str
    perturbed_answers: tuple[str, ...]


def truth_ratio_items(split: TruthRatioSplit) -> list[TruthRatioItem]:
    """All rows of a packaged perturbed split, in file order.

    TOFU's evaluation scores only the first 300 rows of each split (`ds_size: 300`), which cuts forget10_perturbed and
    retain_perturbed (400 rows each); compare with published numbers on that prefix.
    """
    if split not in FORGET_SPLITS | OPTION_SPLITS | {"retain_perturbed"}:
        raise ValueError(f"{split!r} is not a TOFU split with perturbed answers")
    base_key = "answer" if split in OPTION_SPLITS else "paraphrased_answer"
    items = []
    for row in load_split(split):
        perturbed = tuple(row["perturbed_answer"])
        if not perturbed:
            raise ValueError(f"{split}: no perturbed answers for {row['question']!r}")
        items.append(TruthRatioItem(row["question"], row["answer"], row[base_key], perturbed))
    return items
