"""The served model as registration jobs that measure it see it (``guards.base.ServedModel``): ECO's σ calibration.

Such a job runs on the job worker's thread, while the engine lives on the serving replica's event loop: generations are
submitted to that loop and awaited from the job's thread, through the same pipeline path (``Planner.engine_plan``) that
serves requests, so a calibrated σ is measured on exactly what clients get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from guards.base import ComposedPlan, PromptView
from server.pipeline import Pipeline
from server.planner import ChatTurn, EnginePlan, RenderedPrompt

GENERATION_TIMEOUT_S = 600.0


class PipelineServedModel:
    """Renders questions and generates greedy replies through a serving replica's pipeline and engine."""

    def __init__(self, pipeline: Pipeline, loop: asyncio.AbstractEventLoop, tokenizer: Any) -> None:
        self._pipeline = pipeline
        self._loop = loop
        self.tokenizer = tokenizer

    def render_question(self, question: str) -> PromptView:
        return self._pipeline.render_chat([ChatTurn("user", question)]).view()

    def greedy_replies(self, prompts: Sequence[PromptView], plans: Sequence[ComposedPlan | None], max_tokens: int,
                       tag: str) -> list[str]:
        engine_plans = [self._engine_plan(prompt, plan) for prompt, plan in zip(prompts, plans, strict=True)]

        async def all_replies() -> list[str]:
            return list(await asyncio.gather(*(self._pipeline.generate_text(plan, max_tokens, f"{tag}-{i}")
                                               for i, plan in enumerate(engine_plans))))

        return asyncio.run_coroutine_threadsafe(all_replies(), self._loop).result(timeout=GENERATION_TIMEOUT_S)

    def _engine_plan(self, prompt: PromptView, plan: ComposedPlan | None) -> EnginePlan:
        rendered = RenderedPrompt.from_view(prompt)
        if plan is None:
            return EnginePlan(prompt={"prompt_token_ids": rendered.token_ids})
        return self._pipeline.planner.engine_plan(rendered, plan)
