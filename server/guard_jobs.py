"""Registration-time jobs of the guards: GUARD's phrase extraction and ECO's σ calibration.

``guard_phrases`` needs only the sentence embedder, so any worker (``lethe worker`` too) runs it. ``eco_calibrate``
measures the *served* model, so it runs in a serving replica: the job thread submits generations to the replica's
event loop, through the same pipeline path (``Planner.engine_plan``) that serves requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from classifiers.aliases import AliasMatcher
from classifiers.embedding import Embedder
from classifiers.negatives import builtin_negative_pool
from evals.metrics import rouge_l_recall
from guards.base import ComposedPlan, PlanRequest, TargetHit
from guards.eco import ENTITIES, PROMPT, EcoGuard, SigmaSearchConfig, zeroth_order_sigma_search
from guards.guard_filter import build_phrase_artifact
from server.classifier_jobs import target_spec
from server.jobs import JobContext, JobHandler
from server.pipeline import Pipeline
from server.planner import ChatTurn, EnginePlan, RenderedPrompt, request_seed

logger = logging.getLogger(__name__)

GENERATION_TIMEOUT_S = 600.0
# ROUGE-L over a dozen replies moves by a few hundredths from noise alone; "as if about an unrelated author" means
# within this margin of that level.
GOAL_MARGIN = 0.05
_NO_EMBEDDINGS = np.zeros((0, 0), dtype=np.float32)


def guard_phrases_handler(embedder: Callable[[], Embedder]) -> JobHandler:
    """Extract the target's forbidden phrases and retrieval keys into a content-addressed artifact."""

    def run(context: JobContext) -> dict[str, Any]:
        context.progress(0.1, "extracting forbidden phrases")
        staging = context.artifacts.staging_dir()
        figures = build_phrase_artifact(target_spec(context.target), embedder(), staging)
        return {"artifact": context.artifacts.commit(staging), **figures}

    return run


def unrelated_questions(record_retain: list[dict[str, Any]], count: int, seed: str) -> list[str]:
    """Questions about someone else: the target's retain questions, else other authors' from the negative pool."""
    questions = [item["question"] for item in record_retain if item.get("question")]
    if not questions:
        questions = [n.text for n in builtin_negative_pool() if n.source == "tofu_other_authors" and n.text.endswith("?")]
    rng = random.Random(seed)
    return [questions[i % len(questions)] for i in rng.sample(range(len(questions)), min(count, len(questions)))]


class EcoCalibrator:
    """ECO's σ search against the served model (SPEC §6), run as the ``eco_calibrate`` job in a serving replica.

    objective(σ) = mean ROUGE-L recall of the gold answers in the greedy replies to (a sample of) the target's forget
    questions with ECO applied at σ; the goal is the level an answer about an unrelated author reaches (the served
    model's replies to retain / other authors' questions scored against the same gold answers) plus ``GOAL_MARGIN``,
    unless the target's ``eco.goal`` option sets it.
    """

    def __init__(self, pipeline: Pipeline, eco: EcoGuard, loop: asyncio.AbstractEventLoop, questions: int,
                 max_tokens: int, search: SigmaSearchConfig = SigmaSearchConfig()) -> None:
        self._pipeline = pipeline
        self._eco = eco
        self._loop = loop
        self._questions = questions
        self._max_tokens = max_tokens
        self._search = search

    def __call__(self, context: JobContext) -> dict[str, Any]:
        record = context.target
        options = dict(record.mechanisms.get("eco", {}).get("options", {}))
        qa = [(item["question"], item["answer"]) for item in record.forget if item.get("question")]
        if not qa:
            raise ValueError("ECO calibration needs question/answer forget items; register eco.sigma instead")
        sample = random.Random(record.id).sample(qa, min(self._questions, len(qa)))
        golds = [answer for _, answer in sample]
        matcher = AliasMatcher(record.aliases)
        prompts = [self._pipeline.render_chat([ChatTurn("user", question)]) for question, _ in sample]
        spans = [tuple(replace(span, turn=0) for span in matcher.find(question)) for question, _ in sample]

        def replies(sigma: float | None, chosen: list[RenderedPrompt], scope: str = ENTITIES) -> list[str]:
            """Greedy replies with ECO at σ over ``scope``, or unprotected when σ is None."""
            if sigma is None:
                plans = [EnginePlan(prompt={"prompt_token_ids": prompt.token_ids}) for prompt in chosen]
            else:
                scoped = {**options, "scope": scope, "sigma": sigma}
                plans = [self._plan(prompt, record.id, record.aliases, prompt_spans, scoped)
                         for prompt, prompt_spans in zip(chosen, spans, strict=True)]
            return self._generate(plans, context.job.id)

        def score(answers: list[str]) -> float:
            return statistics.fmean(rouge_l_recall(answer, gold) for answer, gold in zip(answers, golds))

        context.progress(0.02, "measuring the unprotected model")
        unprotected = score(replies(None, prompts))
        if options.get("goal") is not None:
            goal = float(options["goal"])
        else:
            others = unrelated_questions(record.retain, len(sample), record.id)
            other_prompts = [self._pipeline.render_chat([ChatTurn("user", q)]) for q in others]
            other_answers = replies(None, other_prompts)
            goal = GOAL_MARGIN + statistics.fmean(rouge_l_recall(other_answers[i % len(other_answers)], gold)
                                                  for i, gold in enumerate(golds))

        scopes = [ENTITIES, PROMPT] if options.get("scope", "auto") == "auto" else [options["scope"]]
        curves: dict[str, list[list[float]]] = {}
        for attempt, scope in enumerate(scopes):
            share = 0.85 / len(scopes)

            def on_step(step: int, sigma: float, value: float, scope: str = scope, attempt: int = attempt) -> None:
                context.progress(0.1 + share * (attempt + min(1.0, (step + 1) / self._search.max_steps)),
                                 f"{scope} step {step + 1}: sigma={sigma:.4g} forget ROUGE-L={value:.3f} "
                                 f"(goal {goal:.3f})")

            result = zeroth_order_sigma_search(lambda sigma, scope=scope: score(replies(sigma, prompts, scope)), goal,
                                               self._search, on_step)
            curves[scope] = [[sigma, round(value, 4)] for sigma, value in result.curve]
            if result.reached_goal:
                break
        logger.info("eco.calibrated", extra={"target_id": record.id, "sigma": result.sigma, "scope": scope,
                                             "goal": round(goal, 4), "reached": result.reached_goal,
                                             "evaluations": sum(len(c) for c in curves.values())})
        return {"sigma": result.sigma, "scope": scope, "goal": round(goal, 4), "reached_goal": result.reached_goal,
                "unprotected_rouge_l": round(unprotected, 4), "questions": len(sample), "curves": curves}

    def _plan(self, prompt: RenderedPrompt, target_id: str, aliases: list[str], spans: tuple,
              options: dict[str, Any]) -> EnginePlan:
        hit = TargetHit(target_id, 1.0, spans, tuple(aliases), options, {})
        request = PlanRequest(hit=hit, prompt=prompt.view(), query_embeddings=_NO_EMBEDDINGS,
                              seed=request_seed(prompt.token_ids, target_id, None))
        composed = ComposedPlan()
        composed.add(self._eco.name, self._eco.plan(request))
        return self._pipeline.planner.engine_plan(prompt, composed)

    def _generate(self, plans: list[EnginePlan], job_id: str) -> list[str]:
        batch = uuid.uuid4().hex[:8]

        async def all_replies() -> list[str]:
            return await asyncio.gather(*(self._pipeline.generate_text(plan, self._max_tokens, f"{job_id}-{batch}-{i}")
                                          for i, plan in enumerate(plans)))

        future = asyncio.run_coroutine_threadsafe(all_replies(), self._loop)
        return future.result(timeout=GENERATION_TIMEOUT_S)


