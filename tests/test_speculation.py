"""Speculative plain prefill (``server/speculation.py``): a prompt's plain request starts while it is classified, is
the reply when the prompt is clean, and is aborted unread when it is not (the real engine: test_unlearning_guards)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.sampling_params import SamplingParams

from guards.base import MechanismPlan
from server.errors import GuardFailed
from server.pipeline import Pipeline
from server.run import RunRequest
from tests.pipeline_fakes import HI, AddRow, FakeBank, FakeEngine, FakeMechanism, guarded, params


@dataclass
class TracingEngine(FakeEngine):
    """Replies "plain" to a request that carries only token ids and "guarded" to any other, and records which
    requests were submitted, read past their first output, and closed before finishing."""

    submitted: threading.Event = field(default_factory=threading.Event)
    closed: list[str] = field(default_factory=list)
    delay_s: float = 0.0

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        plain = set(prompt) == {"prompt_token_ids"} and params.extra_args is None and lora_request is None
        kind = "plain" if plain else "guarded"
        self.calls.append((prompt, params, kind))
        self.submitted.set()
        finished = False
        try:
            for step in range(2):
                await asyncio.sleep(self.delay_s)
                outputs = [SimpleNamespace(index=0, text=f"{kind}{step} ", token_ids=[step], logprobs=None,
                                           finish_reason="length" if step else None, stop_reason=None)]
                yield SimpleNamespace(outputs=outputs)
            finished = True
        finally:
            if not finished:
                self.closed.append(kind)


@dataclass
class ClassifierAfterSubmission(FakeBank):
    """A bank that waits (on the classifier thread) until the engine has a request, and records whether it had."""

    engine: TracingEngine | None = None
    wait_s: float = 2.0
    saw_submission: list[bool] = field(default_factory=list)

    def score_many(self, conversations):
        self.saw_submission.append(self.engine.submitted.wait(timeout=self.wait_s))
        return super().score_many(conversations)


def speculating(engine: TracingEngine, bank: FakeBank, *fakes: FakeMechanism, **kwargs: Any) -> Pipeline:
    pipeline = guarded(engine, *fakes, bank=bank, **kwargs)
    pipeline.speculate = True  # as the server builds it with LETHE_SPECULATIVE_PREFILL=true
    return pipeline


def guard_plan() -> FakeMechanism:
    return FakeMechanism("guard", MechanismPlan(processor_args={"guard": [{"phrases": ["x"]}]}))


async def reply(pipeline: Pipeline, **request: Any) -> tuple[Any, str]:
    run = await pipeline.start(RunRequest("chat", "req-1", HI, params=params(max_tokens=2), **request))
    async with run:
        return run, "".join([event.text async for event in run.events()])


def prefills(pipeline: Pipeline, outcome: str) -> float:
    return pipeline._metrics.registry.get_sample_value("lethe_speculative_prefills_total", {"outcome": outcome}) or 0


async def test_a_clean_prompt_is_submitted_before_its_classification_ends_and_that_request_is_the_reply() -> None:
    engine = TracingEngine()
    bank = ClassifierAfterSubmission(hits=False, engine=engine)
    pipeline = speculating(engine, bank, guard_plan())
    run, text = await reply(pipeline)
    assert bank.saw_submission == [True]  # the engine had the prompt while the gate was still reading it
    assert text == "plain0 plain1 " and [kind for _, _, kind in engine.calls] == ["plain"] and not engine.closed
    assert engine.calls[0][1].max_tokens == 2 and run.outcome == "served"
    assert (prefills(pipeline, "kept"), prefills(pipeline, "discarded")) == (1, 0)


async def test_a_flagged_prompts_plain_request_is_aborted_unread_and_the_protected_one_replies() -> None:
    engine = TracingEngine()
    bank = ClassifierAfterSubmission(hits=True, engine=engine)
    pipeline = speculating(engine, bank, guard_plan())
    run, text = await reply(pipeline)
    assert bank.saw_submission == [True]
    assert text == "guarded0 guarded1 " and run.mechanisms == ["guard"]
    assert [kind for _, _, kind in engine.calls] == ["plain", "guarded"] and engine.closed == ["plain"]
    assert (prefills(pipeline, "kept"), prefills(pipeline, "discarded")) == (0, 1)


async def test_a_plain_request_whose_first_output_was_ready_is_still_aborted_for_a_flagged_prompt() -> None:
    engine = TracingEngine()

    class SlowBank(FakeBank):
        def score_many(self, conversations):
            engine.submitted.wait(timeout=2)
            threading.Event().wait(0.05)  # the plain request's first output is out by now
            return super().score_many(conversations)

    eco = FakeMechanism("eco", MechanismPlan(embedding_edits=(AddRow(),)))
    pipeline = speculating(engine, SlowBank(hits=True), eco)
    _, text = await reply(pipeline)
    assert text == "guarded0 guarded1 " and engine.closed == ["plain"]


async def test_a_classifier_failure_aborts_the_plain_request_and_refuses_the_prompt() -> None:
    engine = TracingEngine(delay_s=0.01)
    pipeline = speculating(engine, FakeBank(error=RuntimeError("bank down")), guard_plan())
    with pytest.raises(GuardFailed):
        await pipeline.start(RunRequest("chat", "req-1", HI, params=params(max_tokens=2)))
    await asyncio.sleep(0)
    assert engine.closed == ["plain"] and prefills(pipeline, "discarded") == 1


async def test_a_kept_request_the_endpoint_never_reads_is_aborted_when_the_run_ends() -> None:
    engine = TracingEngine(delay_s=0.01)
    pipeline = speculating(engine, FakeBank(hits=False), guard_plan())
    run = await pipeline.start(RunRequest("chat", "req-1", HI, params=params(max_tokens=2)))
    with pytest.raises(RuntimeError):
        async with run:
            raise RuntimeError("the endpoint failed before generating")
    assert engine.closed == ["plain"] and run.outcome == "error"


async def test_no_speculation_without_sampling_parameters_or_when_every_prompt_is_protected() -> None:
    engine = TracingEngine()
    pipeline = speculating(engine, FakeBank(hits=False), guard_plan())
    run = await pipeline.start(RunRequest("score", "req-1", HI))  # scoring: nothing is generated
    async with run:
        pass
    assert engine.calls == []
    always = speculating(TracingEngine(), FakeBank(hits=False),
                         FakeMechanism("guard", MechanismPlan(processor_args={"guard": []}), gated_by="always"))
    _, text = await reply(always)
    assert text == "guarded0 guarded1 " and [kind for _, _, kind in always._engine.calls] == ["guarded"]


async def test_off_the_prompt_is_submitted_only_once_classified() -> None:
    engine = TracingEngine()
    bank = ClassifierAfterSubmission(hits=False, engine=engine, wait_s=0.1)
    pipeline = guarded(engine, guard_plan(), bank=bank)  # speculate=False, Pipeline's default
    _, text = await reply(pipeline)
    assert bank.saw_submission == [False] and text == "plain0 plain1 " and len(engine.calls) == 1
    assert prefills(pipeline, "kept") == 0
