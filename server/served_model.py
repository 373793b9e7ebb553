"""The served model as the server's own measuring jobs see it: ECO's σ calibration (``guards.base.ServedModel``) and
the erasure report's verification (``server.verification.job.ProbedModel``).

Such a job runs on the job worker's thread, while the engine lives on the serving replica's event loop: generations are
submitted to that loop and awaited from the job's thread, through the same pipeline that serves requests
(``Planner.engine_plan`` for a plan a job made, ``Pipeline.start`` for a request classified and planned as a client's
is), so what they measure is exactly what clients get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from guards.base import ComposedPlan, PromptView
from server.errors import GuardFailed
from server.pipeline import Pipeline
from server.planner import ChatTurn, EnginePlan, RenderedPrompt, plain_plan
from server.run import ChatPrompt, RunRequest
from server.verification.job import GuardedReply
from server.verification.probes import Probe

GENERATION_TIMEOUT_S = 600.0
VERIFY_ENDPOINT = "verify"  # the metrics' and log lines' label of a verification probe (never audited)
T = TypeVar("T")


class PipelineServedModel:
    """Renders prompts and generates greedy replies through a serving replica's pipeline and engine."""

    def __init__(self, pipeline: Pipeline, loop: asyncio.AbstractEventLoop, tokenizer: Any) -> None:
        self._pipeline = pipeline
        self._loop = loop
        self.tokenizer = tokenizer

    # ------------------------------------------------------------ guards.base.ServedModel (ECO's calibration)

    def render_question(self, question: str) -> PromptView:
        return self._pipeline.render_chat([ChatTurn("user", question)]).view()

    def greedy_replies(self, prompts: Sequence[PromptView], plans: Sequence[ComposedPlan | None], max_tokens: int,
                       tag: str) -> list[str]:
        engine_plans = [self._engine_plan(prompt, plan) for prompt, plan in zip(prompts, plans, strict=True)]
        return self._all(self._pipeline.generate_text(plan, max_tokens, f"{tag}-{i}")
                         for i, plan in enumerate(engine_plans))

    def _engine_plan(self, prompt: PromptView, plan: ComposedPlan | None) -> EnginePlan:
        rendered = RenderedPrompt.from_view(prompt)
        if plan is None:
            return plain_plan(rendered)
        return self._pipeline.planner.engine_plan(rendered, plan)

    # ------------------------------------------------------------ ProbedModel (the erasure report's verification)

    def serving_revision(self) -> int:
        return self._pipeline.serving_revision

    def plain_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[str]:
        plans = []
        for probe in probes:
            rendered = self._pipeline.render_chat(_turns(probe), add_generation_prompt=not probe.prefill,
                                                  continue_final_message=probe.prefill)
            plans.append(plain_plan(rendered))
        return self._all(self._pipeline.generate_text(plan, max_tokens, f"{tag}-{i}") for i, plan in enumerate(plans))

    def guarded_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[GuardedReply]:
        return self._all(self._guarded(probe, max_tokens, f"{tag}-{i}") for i, probe in enumerate(probes))

    async def _guarded(self, probe: Probe, max_tokens: int, request_id: str) -> GuardedReply:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
        request = RunRequest(endpoint=VERIFY_ENDPOINT, request_id=request_id, max_tokens=max_tokens, audited=False,
                             prompt=ChatPrompt(tuple(_turns(probe)), add_generation_prompt=not probe.prefill,
                                               continue_final_message=probe.prefill), params=params)
        try:
            run = await self._pipeline.start(request)
        except GuardFailed:
            return GuardedReply(text="", targets=(), mechanisms=(), refused=True)
        text = []
        async with run:
            async for event in run.events():
                text.append(event.text)
        return GuardedReply(text="".join(text), targets=tuple(run.hit_target_ids), mechanisms=tuple(run.mechanisms))

    def _all(self, coroutines: Any) -> list[T]:
        async def gather(items: list[Awaitable[T]]) -> list[T]:
            return list(await asyncio.gather(*items))

        return asyncio.run_coroutine_threadsafe(gather(list(coroutines)), self._loop).result(
            timeout=GENERATION_TIMEOUT_S)


def _turns(probe: Probe) -> list[ChatTurn]:
    return [ChatTurn(role, content) for role, content in probe.turns]
