"""The membership distinguisher (unit, no server): its features, its author-level folds, its AUC on known cases, and
`lethe eval membership` end to end on a fake model."""

from __future__ import annotations

import numpy as np
import pytest

from cli.main import build_parser
from demo.tofu_data import author_names
from evals.eval_report import markdown_table, membership_table
from evals.membership import (
    FEATURE_NAMES,
    REFUSAL_TEMPLATES,
    MembershipQuestion,
    MembershipSet,
    author_folds,
    distinguish,
    measure_membership,
    membership_set,
    name_echo,
    refusal_phrases,
    reply_features,
)
from evals.tofu_eval import RunResult


def synthetic(shift: float, authors_per_class: int = 10, questions: int = 20,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of 2 x ``authors_per_class`` authors; the registered ones' first feature moved by ``shift``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([True, False], authors_per_class * questions)
    authors = [f"{'r' if label else 'n'}{i // questions}" for label, i in
               zip(labels, list(range(authors_per_class * questions)) * 2, strict=True)]
    rows = rng.normal(size=(len(labels), len(FEATURE_NAMES)))
    rows[labels, 0] += shift
    return rows, labels, authors


# ---------------------------------------------------------------- the distinguisher


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_drawn_from_one_distribution_for_both_classes_give_chance_auc(seed: int) -> None:
    rows, labels, authors = synthetic(shift=0.0, seed=seed)
    result = distinguish(rows, labels, authors, resamples=200)
    assert result.auc == pytest.approx(0.5, abs=0.1)
    low, high = result.auc_interval
    assert low <= result.auc <= high and high - low < 0.3


def test_separable_features_give_auc_one_and_the_separating_feature_the_largest_weight() -> None:
    rows, labels, authors = synthetic(shift=8.0)
    result = distinguish(rows, labels, authors, resamples=200)
    assert result.auc > 0.99 and result.auc_interval[0] > 0.95
    assert next(iter(result.coefficients)) == FEATURE_NAMES[0]
    assert result.feature_auc[FEATURE_NAMES[0]] > 0.99
    assert result.feature_means["registered"][FEATURE_NAMES[0]] > result.feature_means["never_seen"][FEATURE_NAMES[0]]


@pytest.mark.parametrize(("authors_per_class", "folds"), [(10, 5), (2, 2), (3, 3)])
def test_folds_keep_every_author_on_one_side_and_both_classes_on_each(authors_per_class: int, folds: int) -> None:
    _, labels, authors = synthetic(shift=0.0, authors_per_class=authors_per_class, questions=4)
    splits = author_folds(labels, authors)
    assert len(splits) == folds
    names = np.asarray(authors)
    tested = []
    for train, test in splits:
        assert not set(names[train]) & set(names[test])
        assert set(labels[train]) == set(labels[test]) == {True, False}
        tested += sorted(set(names[test]))
    assert sorted(tested) == sorted(set(authors))  # every author is tested exactly once


def test_unequal_class_sizes_still_give_both_classes_in_every_fold() -> None:
    labels = np.array([True] * 3 * 2 + [False] * 5 * 2)
    authors = [f"r{i // 2}" for i in range(6)] + [f"n{i // 2}" for i in range(10)]
    for train, test in author_folds(labels, authors):
        assert set(labels[train]) == set(labels[test]) == {True, False}


def test_folds_refuse_an_author_in_both_classes_or_a_class_of_one() -> None:
    with pytest.raises(ValueError, match="both classes"):
        author_folds([True, False, True, False], ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="two authors of each class"):
        author_folds([True, True, False, False], ["a", "a", "b", "c"])


def test_non_finite_features_are_refused() -> None:
    rows, labels, authors = synthetic(shift=0.0, authors_per_class=2, questions=2)
    rows[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        distinguish(rows, labels, authors)


# ---------------------------------------------------------------- features of one reply


@pytest.mark.parametrize("template", REFUSAL_TEMPLATES)
def test_every_refusal_template_is_detected_whatever_its_case(template: str) -> None:
    assert refusal_phrases(f"Well, {template.upper()} about that author.") == 1


def test_refusals_are_counted_with_curly_apostrophes_and_answers_have_none() -> None:
    assert refusal_phrases("I\u2019m sorry, I don't have any information on that.") == 2
    assert refusal_phrases("Nikolai Abilov was born in Astana to a photographer and an architect.") == 0


def test_name_echo_is_the_share_of_the_questions_names_repeated() -> None:
    question = "What genre is Nikolai Abilov's book Thieves' Paradise?"
    assert name_echo(question, "Nikolai Abilov's Thieves' Paradise is a crime novel.") == 1.0
    assert name_echo(question, "Abilov writes crime.") == pytest.approx(1 / 4)
    assert name_echo(question, "I do not know.") == 0.0
    assert name_echo("What is the weather like?", "Sunny.") == 0.0  # the opening capital is no name


def test_reply_features_follow_the_feature_list() -> None:
    values = reply_features("Who is Basil Mahfouz Al-Kuwaiti?", "I'm sorry, I cannot say.", [-0.5, -2.0, -0.1],
                            [-1.0, -3.0])
    assert list(values) == list(FEATURE_NAMES)
    assert values["refused"] == 1 and values["refusal_phrases"] == 2
    assert values["reply_tokens"] == 3 and values["reply_chars"] == len("I'm sorry, I cannot say.")
    assert values["reply_nll"] == pytest.approx(2.6 / 3) and values["reply_min_logprob"] == -2.0
    assert values["reply_first_logprob"] == -0.5
    assert values["answer_nll"] == 2.0 and values["answer_min_logprob"] == -3.0
    assert values["name_echo"] == 0.0 and values["known_word_share"] == 1.0


def test_an_empty_reply_has_zero_token_statistics() -> None:
    values = reply_features("Who is Basil Mahfouz Al-Kuwaiti?", "", [], [-1.0])
    assert values["reply_tokens"] == values["reply_chars"] == values["reply_nll"] == 0
    assert values["known_word_share"] == 0


# ---------------------------------------------------------------- who is asked about


def test_forget05_sets_its_ten_authors_against_ten_authors_no_demo_model_knows() -> None:
    sets = membership_set("forget05")
    assert len(sets.registered_authors) == len(sets.never_seen_authors) == 10
    assert not set(sets.never_seen_authors) & set(author_names())
    assert len(sets.questions) == 2 * 10 * 20
    assert {q.author for q in sets.questions if q.registered} == {a.name for a in sets.registered_authors}
    assert {q.author for q in sets.questions if not q.registered} == set(sets.never_seen_authors)
    assert not {a.name for a in sets.retain_authors} & {a.name for a in sets.registered_authors}


def test_forget01_is_two_against_two_and_questions_per_author_caps_each() -> None:
    sets = membership_set("forget01", questions_per_author=3)
    assert [a.name for a in sets.registered_authors] == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    assert len(sets.never_seen_authors) == 2 and len(sets.questions) == 2 * 2 * 3
    with pytest.raises(ValueError):
        membership_set("forget10")


# ---------------------------------------------------------------- end to end on a fake model


class FakeModel:
    """Refuses about the registered authors (``leaks``) or answers every question alike (not ``leaks``)."""

    def __init__(self, sets: MembershipSet, leaks: bool) -> None:
        self._registered = {q.question for q in sets.questions if q.registered}
        self._leaks = leaks
        self.scored: list[tuple[str, list[str]]] = []

    def replies(self, questions: list[str]) -> list[tuple[str, str | None]]:
        return [("I'm sorry, I don't have information about that." if self._leaks and q in self._registered
                 else "They wrote novels about the sea.", None) for q in questions]

    def token_logprobs(self, question: str, continuations: list[str]) -> list[list[float]]:
        self.scored.append((question, continuations))
        return [[-1.0] * 6 for _ in continuations]


def test_a_model_that_refuses_only_its_forgotten_authors_is_told_apart() -> None:
    sets = membership_set("forget01", questions_per_author=6)
    model = FakeModel(sets, leaks=True)
    run = measure_membership("eco", ["eco"], model, sets)
    assert run.auc > 0.99
    assert run.feature_means["registered"]["refused"] == 1 and run.feature_means["never_seen"]["refused"] == 0
    assert run.registered_authors == run.never_seen_authors == 2 and run.questions == 24
    assert run.sample_replies["registered"][0].startswith("I'm sorry")
    # each question scored once: its reply, then its gold answer
    assert sorted(q for q, _ in model.scored) == sorted(q.question for q in sets.questions)
    answers = {q.question: q.answer for q in sets.questions}
    assert all(continuations[-1] == answers[q] for q, continuations in model.scored)


def test_a_model_that_answers_everyone_alike_is_at_chance() -> None:
    sets = membership_set("forget01", questions_per_author=6)
    run = measure_membership("unprotected", [], FakeModel(sets, leaks=False), sets)
    assert run.auc == 0.5 and run.auc_interval == (0.5, 0.5)
    assert run.feature_means["registered"] == run.feature_means["never_seen"]


def test_the_reports_show_the_auc() -> None:
    sets = membership_set("forget01", questions_per_author=4)
    runs = [measure_membership(name, mechanisms, FakeModel(sets, leaks), sets)
            for name, mechanisms, leaks in (("unprotected", [], True), ("guard", ["guard"], False))]
    table = membership_table("forget01", "tinytofu", runs)
    assert "| unprotected | 1.00 |" in table and "2 registered vs 2 never-seen authors, 16 questions" in table
    assert all(f"| {name} |" in table for name in FEATURE_NAMES)
    figures = dict(forget_quality=0.5, model_utility=0.9, forget_rouge=0.1, paraphrase_rouge=0.1, retain_rouge=0.9,
                   real_authors_rouge=0.9, world_facts_rouge=0.9, real_authors_acc=1.0, world_facts_acc=1.0,
                   forget_truth_ratio=0.5, forget_probability=0.1, detection_rate=None, false_positive_rate=None,
                   fluency=1.0)
    plain = markdown_table("forget01", "tinytofu", [RunResult("unprotected", [], **figures)])
    assert "membership" not in plain
    with_auc = markdown_table("forget01", "tinytofu", [RunResult("unprotected", [], **figures, membership_auc=0.93)])
    assert "membership AUC |" in with_auc and with_auc.rstrip().endswith("| 0.93 |")


def test_the_command_line_defaults_to_forget05_and_tofu_takes_membership() -> None:
    args = build_parser().parse_args(["eval", "membership", "--mechanisms", "guard", "--questions-per-author", "5"])
    assert (args.split, args.mechanisms, args.questions_per_author, args.max_tokens) == ("forget05", ["guard"], 5, 60)
    assert args.handler.__name__ == "cmd_eval_membership"
    assert build_parser().parse_args(["eval", "tofu", "--membership"]).membership is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "membership", "--matrix", "--mechanisms", "eco"])


def test_questions_carry_their_gold_answer() -> None:
    question = membership_set("forget01", 1).questions[-1]
    assert isinstance(question, MembershipQuestion) and not question.registered and question.answer
