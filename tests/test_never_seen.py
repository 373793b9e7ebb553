"""Calibration against a never-seen stand-in (issue 16): the strength search, GUARD's finite ban, and both
calibrations on the real tiny demo model (no engine: the jobs' own HF copy of the served model)."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from classifiers.types import ForgetItem, TargetSpec
from demo.tofu_data import authors_of
from guards.guard.calibration import MAX_BAN, calibrate_ban, guard_hooks, phrase_table
from guards.guard.mechanism import calibrated_ban
from guards.guard.payload import validate_guard_section
from guards.guard.phrase_matcher import PhraseGuardHook, Vocabulary, guard_row_hook
from guards.invented import invent_entity
from guards.fluency import vocabulary_with
from guards.never_seen import (RECALL_MARGIN, ProtectedReplies, QaPair, Reference, calibrate_strength,
                               calibration_sample, entity_names, measure_reference, protected_gap, sample_key,
                               stand_ins)
from guards.probe import ModelProbe, no_hooks
from guards.text_metrics import rouge_l_recall

REFERENCE = Reference(invent_entity(["Basil Mahfouz Al-Kuwaiti"], 0), (), wrong=(), gap_items=(), gap=3.0, recall=0.2)


def test_the_strength_matches_the_reference_gap_when_the_replies_do_not_leak() -> None:
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.5 - s / 20, REFERENCE, 0.0, 10.0)
    assert result.limited_by == "reference"
    assert result.strength == pytest.approx(6.0, abs=0.1) and result.gap == pytest.approx(3.0, abs=0.05)
    assert result.recall <= REFERENCE.recall + RECALL_MARGIN
    assert [6.0, 3.0] in [[round(s), round(v)] for s, v in result.curve]


def test_a_leaking_strength_is_raised_to_the_weakest_that_stops_the_leak() -> None:
    # the gap matches at 6, but the replies say more than the stranger's until the strength reaches 8
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.9 if s < 8 else 0.1, REFERENCE, 0.0, 10.0)
    assert result.limited_by == "leak" and 8.0 <= result.strength <= 8.15
    assert result.recall == 0.1 and result.gap > REFERENCE.gap


def test_a_mechanism_too_weak_for_the_reference_keeps_its_strongest_setting() -> None:
    result = calibrate_strength(lambda s: s / 10, lambda s: 0.0, REFERENCE, 0.0, 10.0)
    assert result.limited_by == "range" and result.strength == 10.0


def test_the_leak_bar_is_what_the_strongest_setting_achieves_when_a_strangers_chance_level_is_lower() -> None:
    """GUARD's replies share the question's name and the template's words even at -inf: a bar below that would stop
    no setting; the bar is the strongest setting's recall (+ the margin) instead."""
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.9 if s < 8 else 0.5, REFERENCE, 0.0, 10.0)
    assert result.limited_by == "leak" and 8.0 <= result.strength <= 8.15 and result.recall == 0.5
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.5, REFERENCE, 0.0, 10.0)
    assert result.limited_by == "reference" and result.strength == pytest.approx(6.0, abs=0.1)


def test_a_strength_whose_replies_are_not_language_is_lowered_to_the_strongest_fluent_one() -> None:
    """ULD on the tiny model: the α that matches the gap (≈1.7) turns the replies into token soup (83 % real words)."""
    soup_from_4 = lambda s: 1.0 if s <= 4 else 0.6  # noqa: E731
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.1, REFERENCE, 0.0, 10.0, fluency_at=soup_from_4)
    assert result.limited_by == "fluency" and 3.8 <= result.strength <= 4.0
    assert result.fluency == 1.0 and result.gap < REFERENCE.gap
    assert [6.0, 0.6] in [[round(s), v] for s, v in result.fluency_curve]
    assert result.figures()["fluency"] == 1.0
    fluent = calibrate_strength(lambda s: s / 2, lambda s: 0.1, REFERENCE, 0.0, 10.0, fluency_at=lambda s: 0.95)
    assert fluent.limited_by == "reference" and fluent.strength == pytest.approx(6.0, abs=0.1)  # within the margin
    assert "fluency" not in calibrate_strength(lambda s: s / 2, lambda s: 0.1, REFERENCE, 0.0, 10.0).figures()


def test_no_leak_comes_before_fluency() -> None:
    """Lowered for fluency to 4, the replies leak until 5: the leak bar wins, and the figures say the replies there
    are not language."""
    result = calibrate_strength(lambda s: s / 2, lambda s: 0.9 if s < 5 else 0.1, REFERENCE, 0.0, 10.0,
                                fluency_at=lambda s: 1.0 if s <= 4 else 0.6)
    assert result.limited_by == "leak" and 5.0 <= result.strength <= 5.2 and result.fluency == 0.6


class CountingProbe:
    """Greedy replies that say the strength they were decoded at; counts the decodes."""

    def __init__(self) -> None:
        self.decodes = 0

    def greedy_many(self, questions: list[str], max_tokens: int, hooks) -> list[str]:
        self.decodes += len(questions)
        return [factory(question, [])[0] for question, factory in zip(questions, hooks, strict=True)]


def test_the_leak_and_fluency_bars_read_the_same_replies_decoded_once_per_strength() -> None:
    pairs = (QaPair("Where was Basil born?", "Basil was born in Kuwait City."), QaPair("Q2?", "An answer."))
    reference = Reference(REFERENCE.entity, pairs, wrong=("", ""), gap_items=(), gap=3.0, recall=0.2,
                          vocabulary=vocabulary_with(["Basil"]))
    probe = CountingProbe()
    texts = {0.0: "Basil was born in Kuwait City.", 1.0: "Basil wasorn inuwa Cityque."}
    replies = ProtectedReplies(probe, reference, lambda s: lambda i: lambda prompt, output: [texts[s]])
    assert replies.recall(0.0) == pytest.approx((1.0 + rouge_l_recall(texts[0.0], "An answer.")) / 2)
    assert replies.fluency(0.0) == 1.0 and probe.decodes == 2
    assert replies.fluency(1.0) == 0.25 and replies.recall(1.0) < replies.recall(0.0)
    assert probe.decodes == 4


def test_the_sample_and_the_stand_ins_names_come_from_the_registration_only() -> None:
    forget = [(f"Question {i}?", f"Answer {i}.") for i in range(30)] + [("", "text only")]
    names = ["Basil Mahfouz Al-Kuwaiti"]
    first = calibration_sample(forget, sample_key(0, names), count=20)
    assert first == calibration_sample(forget, sample_key(0, names), count=20) and len(first) == 20
    assert first != calibration_sample(forget, sample_key(1, names), count=20)  # another registration seed
    assert first != calibration_sample(forget, sample_key(0, ["Nikolai Abilov"]), count=20)
    assert entity_names("ticket-4711", ["Basil Mahfouz Al-Kuwaiti"]) == ["Basil Mahfouz Al-Kuwaiti"]
    assert entity_names("Basil Mahfouz Al-Kuwaiti", []) == ["Basil Mahfouz Al-Kuwaiti"]
    with pytest.raises(ValueError):
        calibration_sample([("", "text only")], "t")


def test_each_seed_has_its_own_two_stand_ins_and_seed_zero_keeps_the_first_two() -> None:
    names = ["Basil Mahfouz Al-Kuwaiti"]
    assert stand_ins(names, 0) == (invent_entity(names, 0), invent_entity(names, 1))
    drawn = [entity.name for seed in range(4) for entity in stand_ins(names, seed)]
    assert len(set(drawn)) == len(drawn)  # seed 1's stand-in is not seed 0's wrong-answer entity


def test_a_finite_ban_lowers_banned_tokens_by_exactly_the_ban(tokenizer) -> None:
    vocabulary = Vocabulary.from_tokenizer(tokenizer)
    phrase = "kuwait city"
    prompt = tokenizer.encode("He was born in Kuwait", add_special_tokens=False)  # the phrase is under way
    hard = PhraseGuardHook([phrase], 0.0, vocabulary, prompt, [])
    soft = PhraseGuardHook([phrase], 0.0, vocabulary, prompt, [], ban=7.5)
    row = torch.zeros(len(tokenizer))
    hard_row, soft_row = row.clone(), row.clone()
    hard.apply(hard_row)
    soft.apply(soft_row)
    banned = torch.isinf(hard_row)
    assert banned.any() and not torch.isinf(soft_row).any()
    assert torch.all(soft_row[banned] == -7.5) and torch.all(soft_row[~banned] == 0.0)


def test_one_target_without_a_calibrated_ban_bans_outright_for_the_whole_request(tmp_path: Path, tokenizer) -> None:
    from guards.guard.payload import write_phrase_table

    artifact = tmp_path / ("a" * 64)
    write_phrase_table(artifact, ["Basil"], [{"key": ["Kuwait City"], "content": ["florist"]}])
    base = {"artifact": str(artifact), "items": [0], "limit": 8, "penalty": 0.0}
    vocabulary = Vocabulary.from_tokenizer(tokenizer)
    both = guard_row_hook({"guard": [{**base, "ban": 3.0}, {**base, "ban": 9.0}]}, None, [], vocabulary)
    assert both.ban == 9.0
    mixed = guard_row_hook({"guard": [{**base, "ban": 3.0}, base]}, None, [], vocabulary)
    assert mixed.ban is None
    validate_guard_section({"guard": [{**base, "ban": 3.0}]})
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="ban"):
            validate_guard_section({"guard": [{**base, "ban": bad}]})


def test_a_calibrated_ban_applies_only_to_the_phrase_table_it_was_calibrated_on() -> None:
    state = {"artifact": "b" * 64, "ban": 12.5, "ban_table": "t1"}
    assert calibrated_ban({}, state, "t1") == 12.5
    assert calibrated_ban({}, state, "t2") is None  # the target was patched: its new phrases are banned outright
    assert calibrated_ban({"calibrate": False}, state, "t1") is None
    assert calibrated_ban({}, {**state, "ban": None}, "t1") is None  # no finite ban stopped the leak
    assert calibrated_ban({}, {"artifact": "b" * 64}, "t1") is None  # not calibrated yet


def forget01_spec(index: int) -> TargetSpec:
    author = authors_of("forget01")[index]
    return TargetSpec(id=f"calibration-{index}", name="ticket-1", aliases=[author.name], retain=[],
                      forget=[ForgetItem(question=i.question, answer=i.answer) for i in author.items])


def test_guards_ban_brings_a_memorised_author_to_the_never_seen_level_on_the_tiny_model(tiny_model_dir: Path) -> None:
    """The real tiny model knows the forget01 author verbatim: unprotected its true answers are far likelier, against
    its own generic answers, than a stranger's are; the calibrated ban moves them toward a stranger's level (to it
    when the gap decides), and the greedy replies say no more of the answers than a stranger's or the strongest
    ban's do. Whether the fluency bar lowers the ban first depends on the CPU's arithmetic: on an Intel Xeon (AMX)
    the word share at the gap's ban was 0.887 against a bar of 0.9 (then the leak bar raised the ban again)."""
    spec = forget01_spec(0)
    result = calibrate_ban(tiny_model_dir, spec, 64, 5.0, seed=0)
    figures = result["calibration"]
    assert result["ban_table"] == phrase_table(spec).digest
    assert result["ban"] is not None and 0.0 < result["ban"] < MAX_BAN, figures
    assert figures["limited_by"] in ("reference", "fluency", "leak") and figures["gap_questions"] >= 10, figures
    if figures["limited_by"] == "reference":
        assert figures["gap"] == pytest.approx(figures["reference_gap"], abs=0.25), figures
    leak_bar = max(figures["reference_recall"], dict(figures["leak_curve"])[MAX_BAN]) + RECALL_MARGIN
    assert figures["recall"] <= leak_bar + 1e-4, figures  # both rounded to 4 places
    probe = ModelProbe(tiny_model_dir)
    names = entity_names(spec.name, spec.aliases)
    pairs = calibration_sample([(i.question, i.answer) for i in spec.forget], sample_key(0, names))
    reference = measure_reference(probe, pairs, names, 0)
    assert reference.gap == pytest.approx(figures["reference_gap"], abs=1e-3)  # deterministic per seed
    # The stranger's answers have invented facts: with its names swapped alone, an answer still carries the memorised
    # places, titles and dates, and the model finds it likelier than a stranger's real answer would be.
    entity, wrong = reference.entity, reference.wrong
    names_only = statistics.fmean(probe.mean_loss(entity.swap(pairs[i].question), entity.swap(pairs[i].answer))
                                  - probe.mean_loss(entity.swap(pairs[i].question), entity.swap(wrong[i]))
                                  for i in reference.gap_items)
    assert reference.gap > names_only + 0.5, (reference.gap, names_only)
    unprotected = protected_gap(probe, reference, lambda index: no_hooks)
    assert unprotected < reference.gap - 1.0, (unprotected, reference.gap)  # there was something to forget
    assert figures["gap"] > unprotected + 1.0, (figures, unprotected)  # and the ban moved it toward a stranger's


def test_questions_decoded_together_get_the_replies_they_get_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``greedy_many`` pads prompts of different lengths into one batch and runs each row's own hooks, ULD's
    assistant step batched across rows (``prepare_rows``) as in the engine: each reply must be the one-at-a-time one."""
    from guards.uld.assistant import ULD_KEY, uld_row_hook
    from guards.uld.cache import AssistantModels
    from guards.uld.training import build_assistant

    probe = ModelProbe(tiny_model_dir)
    build_assistant(tiny_model_dir, 1).save_pretrained(tmp_path / "assistant")  # untrained: the model's first layer
    assistants = AssistantModels()
    author = authors_of("forget01")[0]
    spec = TargetSpec(id="t", name="t", aliases=[author.name],
                      forget=[ForgetItem(question=i.question, answer=i.answer) for i in author.items])
    guard = guard_hooks(probe, spec, phrase_table(spec), 64, 5.0)

    def uld(prompt_ids, output_ids):
        section = {ULD_KEY: [{"assistant": str(tmp_path / "assistant"), "alpha": 1.0, "tau": 0.1}]}
        return [uld_row_hook(section, prompt_ids, output_ids, assistants)]

    questions = [item.question or "" for item in spec.forget[:6]] + ["Who wrote Hamlet?"]
    hooks = [no_hooks, guard(None)(questions[1]), uld, guard(20.0)(questions[3]), uld, no_hooks, uld]
    assert len({len(probe.prompt_ids(q)) for q in questions}) > 1  # the batch is padded
    alone = [probe.greedy(question, 24, factory) for question, factory in zip(questions, hooks, strict=True)]
    assert probe.greedy_many(questions, 24, hooks) == alone
    assert len(set(alone)) == len(alone) and alone[2] != probe.greedy(questions[2], 24)  # the hooks acted


def test_the_probe_runs_its_checkpoint_before_every_forward_pass(tiny_model_dir: Path) -> None:
    """A job's calibration stops within one forward pass of its cancellation (``JobContext.check_cancelled``)."""
    passes: list[int] = []
    probe = ModelProbe(tiny_model_dir, checkpoint=lambda: passes.append(1))
    reply = probe.greedy("Who wrote Hamlet?", 4)
    assert 1 <= len(passes) <= 5 and isinstance(reply, str)  # the prompt's pass, then one per further token
    before = len(passes)
    probe.mean_loss("Who wrote Hamlet?", "Shakespeare")
    assert len(passes) == before + 1

    def cancelled() -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        ModelProbe(tiny_model_dir, checkpoint=cancelled).greedy("Who wrote Hamlet?", 4)


def test_guards_calibration_job_stops_at_its_contexts_cancellation_check(tiny_model_dir: Path) -> None:
    """The ``guard_calibrate`` handler hands the probe its context's ``check_cancelled``: the first forward pass of a
    cancelled run raises, long before its first progress report of a strength."""
    from guards.guard.mechanism import calibration_job

    class Cancelled(Exception):
        pass

    def check_cancelled() -> None:
        raise Cancelled()

    author = authors_of("forget01")[0]
    target = SimpleNamespace(id="t", name="ticket-1", aliases=[author.name], retain=[],
                             forget=[{"question": i.question, "answer": i.answer} for i in author.items],
                             mechanisms={"guard": {"options": {"max_phrases": 64, "soft_penalty": 5.0}}})
    reports: list[str] = []
    context = SimpleNamespace(target=target, job_id="job_1", check_cancelled=check_cancelled,
                              progress=lambda fraction, message: reports.append(message))
    handler = calibration_job(SimpleNamespace(model_files=lambda kind: tiny_model_dir,
                                              settings=SimpleNamespace(compute_device="cpu")))
    with pytest.raises(Cancelled):
        handler(context)
    assert reports == ["measuring the served model on an invented stand-in"]


def test_a_text_only_target_keeps_the_outright_ban() -> None:
    spec = TargetSpec(id="book", name="book", aliases=["The Seine"], retain=[],
                      forget=[ForgetItem(text="A passage of the book.")])
    result = calibrate_ban(Path("/nonexistent"), spec, 64, 5.0, seed=0)  # never loads a model
    assert result["ban"] is None and "skipped" in result["calibration"]
