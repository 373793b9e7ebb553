"""What `lethe eval tofu` measures (unit, no server): its sets, its runs, and how losses become TOFU figures."""

from __future__ import annotations

import json

import pytest

from cli.eval import mechanism_sets
from cli.main import build_parser, parse_args
from demo.phrasings import packaged_phrasings
from evals.paraphrase_oracle import jaccard_best, trained_and_held_out
from evals.eval_report import markdown_table
from evals.tofu_eval import (RunResult, configurations, eval_sets, multiple_choice_accuracy, over_seeds,
                              question_losses, run_count, summary, target_body)
from evals.tofu_metrics import QuestionLosses, TruthRatioItem, forget_quality


def test_forget01_sets_are_its_two_authors_and_the_other_eighteen_demo_authors() -> None:
    sets = eval_sets("forget01")
    assert [a.name for a in sets.forget_authors] == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    assert len(sets.forget) == len(sets.paraphrased_questions) == 40
    assert len(sets.retain) == 18 * 20 and len(sets.retain_authors) == 18
    forget_questions = {item.question for item in sets.forget}
    assert not forget_questions & {item.question for item in sets.retain}
    assert sets.paraphrased_questions[0] != sets.forget[0].question
    assert len(sets.real_authors) == 100 and len(sets.world_facts) == 117


def test_limit_keeps_the_first_rows_of_each_set() -> None:
    sets = eval_sets("forget05", limit=3)
    assert len(sets.forget_authors) == 10 and len(sets.retain_authors) == 10
    assert [len(s) for s in (sets.forget, sets.paraphrased_questions, sets.retain, sets.real_authors,
                             sets.world_facts)] == [3] * 5


def test_forget10_is_refused_on_the_demo_model() -> None:
    with pytest.raises(ValueError, match="retain"):
        eval_sets("forget10")


def test_runs_are_unprotected_then_the_set_or_the_matrix() -> None:
    assert configurations(None, False) == [(), ("eco", "guard")]
    assert configurations([["uld"]], False) == [(), ("uld",)]
    assert configurations(None, True) == [(), ("eco",), ("guard",), ("uld",), ("o3",), ("eco", "guard"),
                                          ("eco", "guard", "uld", "o3")]
    with pytest.raises(ValueError, match="unknown"):
        configurations([["eco", "lora"]], False)


def test_several_sets_run_side_by_side_after_one_unprotected_run() -> None:
    args = parse_args(build_parser(), ["eval", "tofu", "--mechanisms", "eco,uld", "--mechanisms", " guard , uld",
                       "--mechanisms", "eco,uld"])
    assert mechanism_sets(args.mechanisms) == [["eco", "uld"], ["guard", "uld"], ["eco", "uld"]]
    assert configurations(mechanism_sets(args.mechanisms), False) == [(), ("eco", "uld"), ("guard", "uld")]
    assert mechanism_sets(parse_args(build_parser(), ["eval", "tofu"]).mechanisms) is None
    with pytest.raises(ValueError, match="empty"):
        configurations(mechanism_sets([","]), False)
    with pytest.raises(SystemExit):  # --matrix already names every set
        parse_args(build_parser(), ["eval", "membership", "--matrix", "--mechanisms", "uld"])


class FakeModel:
    """Losses by continuation text, recording what was asked."""

    def __init__(self, losses: dict[str, float]) -> None:
        self._losses = losses
        self.asked: list[list[str]] = []

    def losses(self, question: str, continuations: list[str]) -> list[float]:
        self.asked.append(continuations)
        return [self._losses[text] for text in continuations]


def test_question_losses_score_gold_paraphrase_and_wrong_answers_in_one_call() -> None:
    model = FakeModel({"gold": 0.5, "para": 1.0, "w1": 2.0, "w2": 3.0})
    losses = question_losses(model, TruthRatioItem("q", "gold", "para", ("w1", "w2")))  # type: ignore[arg-type]
    assert model.asked == [["gold", "para", "w1", "w2"]]
    assert losses == QuestionLosses(answer=0.5, base=1.0, perturbed=(2.0, 3.0))


def test_when_the_base_answer_is_the_gold_one_it_is_scored_once() -> None:
    model = FakeModel({"Paris": 0.2, "Rome": 1.0})
    losses = question_losses(model, TruthRatioItem("q", "Paris", "Paris", ("Rome",)))  # type: ignore[arg-type]
    assert model.asked == [["Paris", "Rome"]]
    assert losses == QuestionLosses(answer=0.2, base=0.2, perturbed=(1.0,))


def test_multiple_choice_counts_a_question_right_only_if_the_truth_beats_every_wrong_option() -> None:
    right = QuestionLosses(answer=0.5, base=0.5, perturbed=(0.9, 1.2))
    wrong = QuestionLosses(answer=0.5, base=0.5, perturbed=(0.9, 0.4))
    assert multiple_choice_accuracy([right, wrong, right, right]) == 0.75


def test_retain_holds_only_the_authors_the_model_knows() -> None:
    known = ["Hsiao Yun-Hwa", "Elvin Mammadov", "Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]  # tiny-like
    sets = eval_sets("forget01", known_authors=known)
    assert [a.name for a in sets.retain_authors] == ["Hsiao Yun-Hwa", "Elvin Mammadov"]
    expected = [item.question for a in sets.retain_authors for item in a.items]
    assert [row.question for row in sets.retain] == expected
    with pytest.raises(ValueError, match="no demo author"):
        eval_sets("forget01", known_authors=["Nikolai Abilov"])


def test_the_json_keeps_each_runs_truth_ratios_so_forget_quality_can_be_recomputed() -> None:
    """A better retain-only model must not require serving every configuration again (hours on forget05)."""
    runs = [RunResult(name=name, mechanisms=[], forget_quality=quality, model_utility=0.8, forget_rouge=0.1,
                      paraphrase_rouge=0.1, retain_rouge=0.8, real_authors_rouge=0.5, world_facts_rouge=0.6,
                      real_authors_acc=1.0, world_facts_acc=1.0, forget_truth_ratio=0.6, forget_probability=0.01,
                      detection_rate=None, false_positive_rate=None, fluency=0.9, forget_truth_ratios=ratios)
            for name, quality, ratios in [("retain-only model", 1.0, [0.5, 0.6, 0.7]), ("eco", 0.1, [0.9, 0.95, 0.99])]]
    report = json.loads(json.dumps(summary("forget01", runs)))
    reference, served = (run["forget_truth_ratios"] for run in report["runs"])
    assert served == [0.9, 0.95, 0.99]
    assert forget_quality(served, reference) == pytest.approx(forget_quality([0.9, 0.95, 0.99], [0.5, 0.6, 0.7]))


def test_the_paraphrase_oracle_holds_out_exactly_what_the_demo_model_never_trains_on() -> None:
    trained, held_out = trained_and_held_out()
    mined = sum(map(len, packaged_phrasings().values()))
    assert len(held_out) == 200 and len(trained) == 400 + 200 + mined  # 20 × 20 items, half their paraphrases, mined
    assert not {q for q, _ in held_out} & {q for q, _ in trained}
    assert jaccard_best("Where was Nikolai Abilov born?",
                        ["What genre does Nikolai Abilov write?", "In which city was Nikolai Abilov born?"]) == 1


def run(name: str, mechanisms: list[str], quality: float, seed: int | None, auc: float | None = None) -> RunResult:
    return RunResult(name=name, mechanisms=mechanisms, forget_quality=quality, model_utility=0.8, forget_rouge=0.1,
                     paraphrase_rouge=0.1, retain_rouge=0.8, real_authors_rouge=0.5, world_facts_rouge=0.6,
                     real_authors_acc=1.0, world_facts_acc=1.0, forget_truth_ratio=0.6, forget_probability=0.01,
                     detection_rate=None, false_positive_rate=None, fluency=0.9, seed=seed, membership_auc=auc)


def test_each_registration_seed_reaches_every_mechanism_and_the_runs_are_counted_per_seed() -> None:
    sets = eval_sets("forget01")
    body = target_body(sets.forget_authors[0], sets.retain_authors, ["eco", "uld"], seed=2)
    assert body["mechanisms"] == {"eco": {"seed": 2, "noise_key": "tofu-eval-seed-2"}, "uld": {"seed": 2}}
    runs = configurations(None, True)  # unprotected, four alone, the default set, all four
    assert run_count(runs, 1) == 1 + 7 and run_count(runs, 3) == 1 + 1 + 6 * 3


def test_over_seeds_gives_each_configurations_median_and_range_and_the_table_shows_it() -> None:
    runs = [run("retain-only model", [], 1.0, None), run("unprotected", [], 1e-4, None, 0.95),
            *(run(f"guard · seed {seed}", ["guard"], quality, seed, auc)
              for seed, quality, auc in [(0, 0.5, 0.6), (1, 0.1, None), (2, 0.9, 0.4)]),
            run("eco · seed 0", ["eco"], 0.2, 0)]
    guard, eco = over_seeds(runs)
    assert guard.seeds == [0, 1, 2] and guard.mechanisms == ["guard"]
    assert guard.figures["forget_quality"] == {"median": 0.5, "min": 0.1, "max": 0.9}
    assert guard.figures["membership_auc"] == {"median": 0.5, "min": 0.4, "max": 0.6}  # over the seeds that have it
    assert eco.seeds == [0] and "membership_auc" not in eco.figures
    [guard_json, _] = json.loads(json.dumps(summary("forget01", runs)))["over_seeds"]
    assert guard_json["figures"]["forget_quality"]["median"] == 0.5
    table = markdown_table("forget01", "tiny", runs)
    assert "| guard | 0, 1, 2 | 0.5 (0.1–0.9) |" in table
    assert "| eco | 0 |" not in table  # one seed: nothing to summarise
