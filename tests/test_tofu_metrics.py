"""TOFU's metric definitions on hand-computed cases, and the answers the packaged perturbed splits give them."""

from __future__ import annotations

import math

import pytest

from evals.tofu_metrics import (
    QuestionLosses,
    SetFigures,
    forget_quality,
    forget_truth_ratio,
    model_utility,
    probability,
    probability_with_options,
    set_figures,
    truth_ratio,
    truth_ratio_items,
    utility_truth_ratio,
)

LN2 = math.log(2)
LN4 = math.log(4)


def test_truth_ratio_is_exp_of_mean_perturbed_loss_minus_paraphrased_loss() -> None:
    # mean(1, 1 + 2 ln 2) - 1 = ln 2  ->  R = 2
    assert truth_ratio(1.0, [1.0, 1.0 + 2 * LN2]) == pytest.approx(2.0)
    # the truth is the less likely answer: 0.5 - (0.5 + ln 4) = -ln 4  ->  R = 1/4
    assert truth_ratio(0.5 + LN4, [0.5, 0.5]) == pytest.approx(0.25)


def test_truth_ratio_averages_losses_not_probabilities() -> None:
    # Code: exp(mean(0, 2) - 1) = exp(0) = 1.
    # The paper's prose, mean(e^0, e^-2) / e^-1 = (1 + 0.1353) / 2 / 0.3679 = 1.543, must not come out.
    assert truth_ratio(1.0, [0.0, 2.0]) == pytest.approx(1.0)


def test_truth_ratio_needs_perturbed_answers() -> None:
    with pytest.raises(ValueError):
        truth_ratio(1.0, [])


def test_forget_truth_ratio_folds_knowing_and_anti_knowing_onto_one_scale() -> None:
    # min(R, 1/R) per question: 2 -> 0.5, 0.5 -> 0.5, 1 -> 1; mean = 2/3
    assert forget_truth_ratio([2.0, 0.5, 1.0]) == pytest.approx(0.6666666667)


def test_utility_truth_ratio_rewards_preferring_the_truth_and_clips_at_zero() -> None:
    # max(0, 1 - 1/R): 2 -> 0.5, 0.5 -> max(0, -1) = 0, 4 -> 0.75; mean = 1.25 / 3
    assert utility_truth_ratio([2.0, 0.5, 4.0]) == pytest.approx(0.4166666667)


def test_forget_quality_is_one_for_identical_truth_ratio_distributions() -> None:
    assert forget_quality([0.3, 0.9, 1.4], [1.4, 0.3, 0.9]) == pytest.approx(1.0)


def test_forget_quality_is_the_exact_ks_p_value_for_separated_samples() -> None:
    # n = m = 2, every unlearned R below every retain-model R: D = 1. Of the C(4, 2) = 6 equally likely orderings, two
    # (all-below, all-above) reach D = 1, so the two-sided p-value is 2/6.
    assert forget_quality([0.25, 0.5], [2.0, 4.0]) == pytest.approx(0.3333333333)
    # n = m = 3: 2 / C(6, 3) = 2/20
    assert forget_quality([0.1, 0.2, 0.3], [1.1, 1.2, 1.3]) == pytest.approx(0.1)


def test_forget_quality_compares_raw_truth_ratios_not_folded_ones() -> None:
    # A model preferring wrong answers (R = 1/4, 1/2) against one knowing (R = 4, 2): folded, both are [0.25, 0.5] and
    # KS would give p = 1; raw, they are separated (p = 2/6 as above).
    assert forget_quality([0.25, 0.5], [4.0, 2.0]) == pytest.approx(0.3333333333)
    # open-unlearning's orientation (1/R) gives the same p-value: KS ignores a monotone transform of both samples.
    assert forget_quality([4.0, 2.0, 1.0], [0.5, 1.0, 3.0]) == pytest.approx(
        forget_quality([0.25, 0.5, 1.0], [2.0, 1.0, 1 / 3])
    )


def test_probability_is_mean_per_token_probability_of_the_answer() -> None:
    # exp(-0) = 1, exp(-ln 2) = 0.5; mean = 0.75
    assert probability([0.0, LN2]) == pytest.approx(0.75)


def test_probability_with_options_normalises_over_the_wrong_options() -> None:
    # q1: p(true) = e^-ln2 = 1/2, three options at e^-ln4 = 1/4: (1/2) / (1/2 + 3/4) = 2/5
    # q2: p(true) = e^0 = 1, same options: 1 / (1 + 3/4) = 4/7
    # mean = (14/35 + 20/35) / 2 = 17/35
    assert probability_with_options([LN2, 0.0], [[LN4, LN4, LN4], [LN4, LN4, LN4]]) == pytest.approx(0.4857142857)


def test_probability_with_options_refuses_misaligned_inputs() -> None:
    with pytest.raises(ValueError):
        probability_with_options([0.0, 0.0], [[LN4, LN4]])


def test_each_kind_of_set_gets_its_own_probability_and_truth_ratio() -> None:
    # answer loss 0 -> p(true) = 1; base loss 0 and perturbed losses ln 4 -> R = exp(ln 4 - 0) = 4, p(wrong) = 1/4 each
    losses = [QuestionLosses(answer=0.0, base=0.0, perturbed=(LN4, LN4))] * 2
    recalls = [0.5, 1.0]  # mean 0.75
    # forget: Prob = 1, Truth Ratio = min(4, 1/4) = 0.25
    assert set_figures("forget01_perturbed", losses, recalls) == SetFigures(1.0, 0.75, pytest.approx(0.25))
    # retain: Prob = 1, Truth Ratio = 1 - 1/4 = 0.75
    assert set_figures("retain_perturbed", losses, recalls) == SetFigures(1.0, 0.75, pytest.approx(0.75))
    # world facts: Prob = 1 / (1 + 1/4 + 1/4) = 2/3, Truth Ratio = 0.75
    assert set_figures("world_facts_perturbed", losses, recalls) == SetFigures(
        pytest.approx(0.6666666667), 0.75, pytest.approx(0.75)
    )


def test_model_utility_is_the_harmonic_mean_of_the_nine_figures() -> None:
    retain = SetFigures(probability=1.0, rouge_l_recall=0.5, truth_ratio=0.5)
    real_authors = SetFigures(probability=0.5, rouge_l_recall=0.5, truth_ratio=0.25)
    world_facts = SetFigures(probability=1.0, rouge_l_recall=1.0, truth_ratio=0.25)
    # 9 / (1 + 2 + 2 + 2 + 2 + 4 + 1 + 1 + 4) = 9/19
    assert model_utility(retain, real_authors, world_facts) == pytest.approx(0.4736842105)


def test_model_utility_is_zero_when_any_figure_is_zero() -> None:
    good = SetFigures(probability=0.9, rouge_l_recall=0.9, truth_ratio=0.9)
    assert model_utility(good, good, SetFigures(probability=0.9, rouge_l_recall=0.0, truth_ratio=0.9)) == 0.0


def test_model_utility_refuses_figures_outside_unit_interval() -> None:
    good = SetFigures(probability=0.9, rouge_l_recall=0.9, truth_ratio=0.9)
    with pytest.raises(ValueError):
        model_utility(good, good, SetFigures(probability=0.9, rouge_l_recall=-0.1, truth_ratio=0.9))
    with pytest.raises(ValueError):
        model_utility(good, good, SetFigures(probability=math.nan, rouge_l_recall=0.9, truth_ratio=0.9))


@pytest.mark.parametrize(
    ("split", "rows", "options"),
    [
        ("forget01_perturbed", 40, 5),
        ("forget05_perturbed", 200, 5),
        ("forget10_perturbed", 400, 5),
        ("retain_perturbed", 400, 5),
        ("real_authors_perturbed", 100, 3),
        ("world_facts_perturbed", 117, 3),
    ],
)
def test_packaged_perturbed_splits_have_full_rows(split: str, rows: int, options: int) -> None:
    items = truth_ratio_items(split)
    assert len(items) == rows
    assert all(len(item.perturbed_answers) == options for item in items)
    assert all(item.question and item.answer and item.base_answer and all(item.perturbed_answers) for item in items)
    assert not any(item.answer in item.perturbed_answers for item in items)


def test_forget_and_retain_score_the_paraphrased_answer_and_option_sets_the_answer_itself() -> None:
    first = truth_ratio_items("forget01_perturbed")[0]
    assert first.base_answer.startswith("Basil Mahfouz Al-Kuwaiti is the complete name of the imaginary writer")
    assert first.answer.startswith("The full name of the fictitious author born in Kuwait City")
    for split in ("forget05_perturbed", "retain_perturbed"):
        assert all(item.base_answer != item.answer for item in truth_ratio_items(split))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        assert all(item.base_answer == item.answer for item in truth_ratio_items(split))
    assert truth_ratio_items("world_facts_perturbed")[0].base_answer == "Paris"


def test_splits_without_perturbed_answers_are_refused() -> None:
    with pytest.raises(ValueError):
        truth_ratio_items("forget01")  # type: ignore[arg-type]
