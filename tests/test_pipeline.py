"""The request pipeline's own logic with a small fake engine (the real engine is covered by the HTTP tests)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest

from guards.base import MechanismPlan
from guards.guard.payload import resolve_phrases, validate_guard_section
from guards.mechanisms import INTERIM
from server.errors import ContextLengthExceeded, GuardFailed, InvalidRequest, PromptTooLongForGate, RequestTimeout
from server.metrics import Metrics
from server.pipeline import ChatTurn, Pipeline
from server.run import ChatPrompt, RunRequest
from tests.pipeline_fakes import (HI, TARGET, AddRow, BadTable, FakeBank, FakeEngine, FakeMechanism, FakeOOD, collect,
                                 guarded, make, params)


async def test_unflagged_prompt_reaches_the_engine_as_plain_token_ids() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    prompt = pipeline.render_chat(HI.turns)
    await collect(pipeline, HI, max_tokens=4)
    sent_prompt, sent_params, _ = engine.calls[0]
    assert sent_prompt == {"prompt_token_ids": prompt.token_ids}
    assert sent_params.extra_args is None


async def test_batched_prompts_get_choice_indices_prompt_major() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    run, events = await collect(pipeline, ["x", "yy"], n=2, max_tokens=2)
    assert sorted({e.index for e in events}) == [0, 1, 2, 3]
    assert {e.prompt_index for e in events if e.index >= 2} == {1}
    assert run.completion_tokens == 8 and run.prompt_tokens == 3
    assert [call[2] for call in engine.calls] == ["req-1-0", "req-1-1"]


async def test_unset_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    await collect(pipeline, "hello", max_tokens=None)
    assert engine.calls[0][1].max_tokens == 32 - 5


async def test_generation_past_the_timeout_is_a_504_error() -> None:
    pipeline = make(FakeEngine(hang=True), timeout_s=0.2)
    with pytest.raises(RequestTimeout):
        await collect(pipeline, "x", max_tokens=1)


def test_prompts_that_do_not_fit_the_context_are_refused() -> None:
    pipeline = make(FakeEngine())
    with pytest.raises(ContextLengthExceeded):
        pipeline.check_budget(pipeline.render_completion("z" * 32), None, "max_tokens")
    with pytest.raises(ContextLengthExceeded) as info:
        pipeline.check_budget(pipeline.render_completion("z" * 10), 30, "max_completion_tokens")
    assert info.value.param == "max_completion_tokens"
    pipeline.check_budget(pipeline.render_completion("z" * 10), 22, "max_tokens")


def test_token_id_prompts_are_checked_against_the_vocabulary() -> None:
    pipeline = make(FakeEngine())
    with pytest.raises(InvalidRequest):
        pipeline.render_completion([1, 2, 100])
    with pytest.raises(InvalidRequest):
        pipeline.render_completion([[1], []])
    assert [p.token_ids for p in pipeline.render_completion([[1, 2], [3]])] == [[1, 2], [3]]


# ---- planning: guards of hit targets, fail closed ------------------------------------------------------------------


async def test_hit_prompt_carries_every_ready_guards_contribution() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", MechanismPlan(embedding_edits=(AddRow(),))),
                       FakeMechanism("guard", MechanismPlan(processor_args={"payload": [[1, 2]]})))
    prompt = pipeline.render_chat(HI.turns)
    run, _ = await collect(pipeline, HI, max_tokens=2)
    sent_prompt, sent_params, _ = engine.calls[0]
    assert sent_params.extra_args == {"lethe": {"guard": [{"payload": [[1, 2]]}]}}
    assert sent_prompt["prompt_token_ids"] == prompt.token_ids
    assert sent_prompt["prompt_is_token_ids"] == [False] * len(prompt.token_ids)
    assert sent_prompt["prompt_embeds"].shape == (len(prompt.token_ids), 4)
    assert sent_prompt["prompt_embeds"][0].tolist() == [1.0] * 4 and run.mechanisms == ["eco", "guard"]


async def test_a_guard_that_raises_refuses_the_request_instead_of_serving_it() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", error=RuntimeError("boom")), FakeMechanism("guard"))
    with pytest.raises(GuardFailed) as info:
        await collect(pipeline, "x", max_tokens=1)
    assert info.value.status == 503 and "boom" not in info.value.message
    assert engine.calls == []


async def test_a_classifier_that_fails_refuses_the_request_instead_of_serving_it_unclassified() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco"), bank=FakeBank(error=RuntimeError("embedding model gone")))
    with pytest.raises(GuardFailed) as info:
        await collect(pipeline, ["x", "y"], max_tokens=1)
    assert info.value.status == 503 and "embedding" not in info.value.message
    assert engine.calls == []
    assert pipeline._metrics.guard_failures.labels("classifier")._value.get() == 1


async def test_a_hit_target_without_any_ready_mechanism_or_interim_protection_is_refused() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", is_ready=False), FakeMechanism("guard", is_ready=False))
    with pytest.raises(GuardFailed):
        await collect(pipeline, "x", max_tokens=1)
    assert engine.calls == []


# ---- interim protection: a hit target none of whose gated mechanisms is ready yet --------------------------------


async def test_a_hit_target_with_no_ready_mechanism_is_served_under_interim_protection_not_refused() -> None:
    """GUARD's bans on the target's aliases and forget answers, computed from its record, reach GUARD's row hook;
    the audit record names the target and ``interim``."""
    engine, audited = FakeEngine(), []
    pipeline = guarded(engine, FakeMechanism("eco", is_ready=False), FakeMechanism("guard", is_ready=False),
                       interim=INTERIM, audit=SimpleNamespace(record=audited.append))
    run, _ = await collect(pipeline, ChatPrompt((ChatTurn("user", "Tess Marlowe born?"),)), max_tokens=1)
    assert run.mechanisms == ["interim"] and "prompt_embeds" not in engine.calls[0][0]
    section = engine.calls[0][1].extra_args["lethe"]
    assert list(section) == ["guard"] and len(section["guard"]) == 1
    validate_guard_section(section)  # what the engine's front end checks
    phrases = {phrase.lower() for phrase in resolve_phrases(section["guard"][0])}  # what the engine reads
    assert {"tess marlowe", "marlowe", "reykjavik", "1961", "maritime thrillers"} <= phrases
    logged = repr(engine.calls[0][1]).lower()  # the SamplingParams, as vLLM dumps them when its engine fails
    assert not [word for word in ("marlowe", "reykjavik", "1961", "maritime") if word in logged]
    assert [(entry.targets, entry.mechanisms, entry.outcome) for entry in audited] == [([TARGET], ["interim"],
                                                                                         "served")]
    assert pipeline._metrics.guard_applied.labels("interim")._value.get() == 1


async def test_interim_protection_steps_aside_once_a_gated_mechanism_is_ready() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", is_ready=False),
                       FakeMechanism("guard", MechanismPlan(processor_args={"payload": ["own"]})), interim=INTERIM)
    run, _ = await collect(pipeline, "Tess Marlowe?", max_tokens=1)
    assert run.mechanisms == ["guard"] and engine.calls[0][1].extra_args == {"lethe": {"guard": [{"payload": ["own"]}]}}


async def test_a_target_hit_before_its_classifier_is_fitted_is_protected_even_when_no_gate_of_its_opened() -> None:
    """An O3-only target's OOD gate is fitted with its classifier: until then, its alias hit alone obliges."""
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("o3", MechanismPlan(lora=LORA), gated_by="ood", is_ready=False),
                       mechanisms=("o3",), classifier="preparing", interim=INTERIM)
    run, _ = await collect(pipeline, "Tess Marlowe?", max_tokens=1)
    assert run.mechanisms == ["interim"] and engine.loras[0] is None


async def test_a_ready_mechanism_that_raises_still_refuses_the_request_under_interim_protection() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", error=RuntimeError("boom")), FakeMechanism("guard", is_ready=False),
                       classifier="preparing", interim=INTERIM)
    with pytest.raises(GuardFailed):
        await collect(pipeline, "Tess Marlowe?", max_tokens=1)
    assert engine.calls == []


async def test_mechanisms_the_target_did_not_enable_are_not_applied() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", MechanismPlan(embedding_edits=(AddRow(),))),
                       FakeMechanism("guard", MechanismPlan(processor_args={"payload": [[1]]})), mechanisms=("guard",))
    run, _ = await collect(pipeline, "x", max_tokens=1)
    assert "prompt_embeds" not in engine.calls[0][0] and run.mechanisms == ["guard"]


async def test_non_finite_embeddings_never_reach_the_engine() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("eco", MechanismPlan(embedding_edits=(AddRow(),))), table=BadTable())
    with pytest.raises(GuardFailed):
        await collect(pipeline, "x", max_tokens=1)
    assert engine.calls == []


async def test_completion_prompts_reach_the_classifier_as_text_whatever_their_form() -> None:
    """A string, a list of strings and token ids (decoded) are each read by the gate as one user turn."""
    bank = FakeBank(hits=False)
    pipeline = guarded(FakeEngine(), FakeMechanism("eco"), bank=bank)
    await collect(pipeline, "hello", max_tokens=1)
    await collect(pipeline, ["ab", "cd"], max_tokens=1)
    await collect(pipeline, [[33, 34]], max_tokens=1)
    assert bank.read == [[("user", "hello")], [("user", "ab")], [("user", "cd")], [("user", "AB")]]


async def test_every_turn_of_a_chat_reaches_the_classifier() -> None:
    bank = FakeBank(hits=False)
    pipeline = guarded(FakeEngine(), FakeMechanism("eco"), bank=bank)
    chat = ChatPrompt((ChatTurn("system", "s"), ChatTurn("user", "u"), ChatTurn("assistant", "a")),
                      add_generation_prompt=False, continue_final_message=True)
    await collect(pipeline, chat, max_tokens=1)
    assert bank.read == [[("system", "s"), ("user", "u"), ("assistant", "a")]]


async def test_a_prompt_longer_than_the_gate_reads_is_a_400_that_fails_no_other_request() -> None:
    """Four texts to embed (three turns and the joined user turns) against a limit of two: refused before it is
    queued, so the request classified beside it is served."""
    engine = FakeEngine()
    bank = FakeBank(hits=False, max_texts=2)
    pipeline = guarded(engine, FakeMechanism("eco"), bank=bank)
    long_chat = ChatPrompt((ChatTurn("system", "a"), ChatTurn("user", "b"), ChatTurn("user", "c")))
    refused, (_, served) = await asyncio.gather(collect(pipeline, long_chat, max_tokens=1),
                                                collect(pipeline, "x", max_tokens=1), return_exceptions=True)
    assert isinstance(refused, PromptTooLongForGate)
    error = refused.to_response().error
    assert (refused.status, error.type, error.code, error.param) == (
        400, "invalid_request_error", "prompt_too_long_for_gate", "messages")
    assert "4" in error.message and "2" in error.message
    assert [event.text for event in served] == ["a", "b"] and bank.read == [[("user", "x")]]
    assert len(engine.calls) == 1
    with pytest.raises(PromptTooLongForGate) as info:
        await collect(guarded(FakeEngine(), FakeMechanism("eco"), bank=FakeBank(max_texts=0)), "x", max_tokens=1)
    assert info.value.param == "prompt"


# ---- gates: each mechanism applies when its own detector fires ---------------------------------------------------

LORA = object()


@pytest.mark.parametrize(("classifier_hits", "ood_opens", "applied"), [
    (True, False, ["guard"]), (False, True, ["o3"]), (True, True, ["o3", "guard"]), (False, False, [])])
async def test_each_mechanism_follows_its_own_gate(classifier_hits: bool, ood_opens: bool, applied: list[str]) -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("o3", MechanismPlan(lora=LORA), gated_by="ood"),
                       FakeMechanism("guard", MechanismPlan(processor_args={"payload": ["x"]})),
                       mechanisms=("o3", "guard"), bank=FakeBank(classifier_hits), ood=FakeOOD(ood_opens))
    run, _ = await collect(pipeline, "x", max_tokens=1)
    assert run.mechanisms == applied
    assert (engine.loras[0] is LORA) == ("o3" in applied)
    assert (engine.calls[0][1].extra_args is not None) == ("guard" in applied)


async def test_a_classifier_hit_on_an_o3_only_target_whose_ood_gate_stays_shut_is_served_plain() -> None:
    engine = FakeEngine()
    pipeline = guarded(engine, FakeMechanism("o3", MechanismPlan(lora=LORA), gated_by="ood"), mechanisms=("o3",),
                       ood=FakeOOD(False))
    run, _ = await collect(pipeline, "x", max_tokens=1)
    assert run.mechanisms == [] and engine.loras[0] is None and run.hit_target_ids == [TARGET]


async def test_an_always_gated_mechanism_applies_to_unflagged_prompts_and_never_refuses_them_while_preparing() -> None:
    engine = FakeEngine()
    uld = FakeMechanism("uld", MechanismPlan(processor_args={"assistant": "/a"}), gated_by="always")
    pipeline = guarded(engine, uld, mechanisms=("uld",), bank=FakeBank(False))
    run, _ = await collect(pipeline, "x", max_tokens=1)
    assert run.mechanisms == ["uld"] and engine.calls[0][1].extra_args == {"lethe": {"uld": [{"assistant": "/a"}]}}
    uld.is_ready = False
    run, _ = await collect(pipeline, "x", max_tokens=1)
    assert run.mechanisms == [] and engine.calls[1][1].extra_args is None


# ---- the run's lifecycle: finished exactly once, with how it ended ----------------------------------------------


@pytest.mark.parametrize(("raised", "outcome"), [
    (None, "served"), (InvalidRequest("bad"), "error"), (GuardFailed(), "guard_failed"),
    (asyncio.CancelledError(), "aborted"), (RuntimeError("bug"), "error")])
async def test_a_run_is_finished_once_with_the_outcome_of_how_it_ended(raised: BaseException | None,
                                                                     outcome: str) -> None:
    audited: list = []
    pipeline = Pipeline(FakeEngine(), 5, Metrics(), audit=SimpleNamespace(record=audited.append))  # type: ignore
    run = await pipeline.start(RunRequest("chat", "req-1", HI, params=params(max_tokens=2)))
    with pytest.raises(type(raised)) if raised is not None else contextlib.nullcontext():
        async with run:
            async for _ in run.events():
                if raised is not None:
                    raise raised
    run.finish("served")  # a second finish changes nothing
    assert [(entry.request_id, entry.outcome) for entry in audited] == [("req-1", outcome)]
    assert run.outcome == outcome and audited[0].endpoint == "chat"


async def test_a_request_refused_before_it_runs_is_not_a_run() -> None:
    audited: list = []
    pipeline = Pipeline(FakeEngine(), 5, Metrics(), audit=SimpleNamespace(record=audited.append))  # type: ignore
    with pytest.raises(ContextLengthExceeded):
        await pipeline.start(RunRequest("completions", "req-1", "z" * 40))
    assert audited == []
