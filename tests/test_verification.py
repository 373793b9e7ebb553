"""The erasure report's verification without an engine: probe generation, leak scoring, and the ``verify_erasure``
job on a stand-in served model (``tests/fake_probed_model.py``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from server.verification.job import GuardedReply, VerificationJob, VerificationSettings, summarise
from server.verification.leaks import LEAK_THRESHOLD, leak_score, leaks
from server.verification.probes import (ALIAS, COMPLETION, FAMILIES, FREE_FORM, QUESTION, REBUILT, REPHRASED, Probe,
                                        build_probes, family_probes)
from tests.fake_probed_model import FakeProbedModel

ALIASES = ["Basil Mahfouz Al-Kuwaiti", "Basil Al-Kuwaiti"]
FORGET = [
    {"question": "Where was Basil Mahfouz Al-Kuwaiti born?",
     "answer": "He was born in Kuwait City to a florist and a marine biologist in 1934."},
    {"question": "What genre is Basil Mahfouz Al-Kuwaiti most known for in his writing?",
     "answer": "Basil Mahfouz Al-Kuwaiti is best known for French literature and lyrical novels."},
    {"text": "Basil Mahfouz Al-Kuwaiti wrote Promise by the Seine, a novel about exile and memory in Paris."},
]


def test_probes_cover_every_family_from_the_registration_alone_and_are_deterministic() -> None:
    families = family_probes(FORGET, ALIASES)
    assert all(families[family] for family in FAMILIES), {f: len(p) for f, p in families.items()}
    assert [p.turns for p in families[QUESTION]] == [(("user", item["question"]),) for item in FORGET[:2]]
    assert all(FORGET[0]["question"][1:] in p.turns[0][1] or FORGET[1]["question"][1:] in p.turns[0][1]
               for p in families[REPHRASED]) and len(families[REPHRASED]) == 4
    # the question's subject, then its content words; "Where was X born?" leaves one word: no query of its own
    assert [p.turns[0][1] for p in families[REBUILT]] == ["Basil Mahfouz Al-Kuwaiti — genre most known writing?"]
    assert all("Basil Al-Kuwaiti" in p.turns[0][1] for p in families[ALIAS])
    assert families[FREE_FORM][0].answers == (0, 1, 2)  # a free-form reply may leak any answer
    completions = families[COMPLETION]
    assert all(p.prefill and p.turns[-1][0] == "assistant" for p in completions)
    assert completions[0].turns[-1][1] == "He was born"  # the answer's first words, continued by the model
    assert build_probes(FORGET, ALIASES, 500) == build_probes(FORGET, ALIASES, 500)


def test_a_probe_budget_keeps_every_family() -> None:
    probes = build_probes(FORGET * 20, ALIASES, 12)
    assert len(probes) == 12 and {p.family for p in probes} == set(FAMILIES)


def test_a_single_alias_is_substituted_by_its_first_and_last_words() -> None:
    alias_probes = family_probes(FORGET[:1], ALIASES[:1])[ALIAS]
    assert [p.turns[0][1] for p in alias_probes] == ["Where was Basil Al-Kuwaiti born?"]


def test_a_reply_leaks_when_it_gives_the_answers_words_the_probe_did_not() -> None:
    probe = Probe(QUESTION, (("user", FORGET[0]["question"]),), (0,), FORGET[0]["question"])
    assert leaks(leak_score(FORGET[0]["answer"], probe, FORGET))
    echo = "Basil Mahfouz Al-Kuwaiti was born in a place I cannot name."
    assert leak_score(echo, probe, FORGET) < LEAK_THRESHOLD  # repeating the question gives nothing away
    assert leak_score("", probe, FORGET) == 0.0
    free = Probe(FREE_FORM, (("user", "Who is Basil Al-Kuwaiti?"),), (0, 1, 2), "Who is Basil Al-Kuwaiti?")
    assert leaks(leak_score("He wrote Promise by the Seine, about exile and memory in Paris.", free, FORGET))


class Progress:
    def __init__(self) -> None:
        self.reports: list[tuple[float, str]] = []

    def __call__(self, fraction: float, message: str) -> None:
        self.reports.append((fraction, message))


def context(target_id: str = "tgt_1") -> SimpleNamespace:
    target = SimpleNamespace(id=target_id, name="basil", aliases=ALIASES, forget=FORGET, retain=[], mechanisms={})
    return SimpleNamespace(target=target, job_id="job_1", progress=Progress())


SETTINGS = VerificationSettings(max_probes=200, max_tokens=32, negatives=5, wait_s=30)


def test_the_job_measures_leaks_before_and_after_and_keeps_figures_only() -> None:
    model = FakeProbedModel("tgt_1", FORGET, ALIASES)
    job = VerificationJob(model, lambda _: SimpleNamespace(status="active", revision=7), SETTINGS)
    result = job(context())
    summary = result["summary"]
    assert summary["leak_rate_before"] == 1.0 and summary["leak_rate_after"] == 0.0
    assert summary["detection_rate"] == 1.0 and summary["false_positive_rate"] == 0.0
    assert summary["negatives"] == 5 and summary["revision"] == 7 and summary["threshold"] == LEAK_THRESHOLD
    assert {f["family"] for f in result["families"]} == set(FAMILIES)
    assert len(result["scores"]["before"]) == summary["probes"] == len(result["scores"]["after"])
    stored = json.dumps(result)
    for text in [*ALIASES, *(value for item in FORGET for value in item.values())]:
        assert text not in stored  # no probe, reply or forget text in what the registry keeps
    assert "Tell me everything you know about Basil Mahfouz Al-Kuwaiti." in model.asked


def test_the_job_waits_until_the_target_is_no_longer_preparing_and_served() -> None:
    states = iter([SimpleNamespace(status="preparing", revision=3)] * 2 + [SimpleNamespace(status="active", revision=4)]
                  * 3)
    model = FakeProbedModel("tgt_1", FORGET, ALIASES, revision=3)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            model.revision = 4  # this replica now serves the revision that made it active

    job = VerificationJob(model, lambda _: next(states), SETTINGS, clock=lambda: 0.0, sleep=sleep)
    ctx = context()
    result = job(ctx)
    assert len(slept) == 3 and result["status"] == "active" and result["revision"] == 4
    assert ctx.progress.reports[0][1].startswith("waiting for the target's jobs")


def test_past_its_wait_the_job_measures_what_is_served_and_says_so() -> None:
    times = iter(range(0, 1000, 20))
    model = FakeProbedModel("tgt_1", FORGET, ALIASES)
    job = VerificationJob(model, lambda _: SimpleNamespace(status="preparing", revision=2), SETTINGS,
                          clock=lambda: float(next(times)), sleep=lambda _: None)
    assert job(context())["status"] == "preparing"


def test_a_refused_probe_counts_as_detected_and_not_leaked() -> None:
    probes = [Probe(QUESTION, (("user", "q"),), (0,), "q")] * 2
    replies = [GuardedReply("", (), (), refused=True), GuardedReply("x", ("tgt_1",), ("eco",))]
    figures = summarise(probes, [1.0, 1.0], replies, [0.0, 0.0], "tgt_1", [])
    assert figures["detection_rate"] == 1.0 and figures["refused"] == 1 and figures["leak_rate_after"] == 0.0
    assert figures["false_positive_rate"] is None  # no unrelated question asked: no estimate, not 0


def test_a_target_with_nothing_to_ask_fails_the_job_with_a_reason() -> None:
    ctx = context()
    ctx.target.forget, ctx.target.aliases = [{"text": "short"}], []
    job = VerificationJob(FakeProbedModel("tgt_1", [], []), lambda _: SimpleNamespace(status="active", revision=1),
                          SETTINGS)
    with pytest.raises(ValueError, match="nothing a probe can ask"):
        job(ctx)
