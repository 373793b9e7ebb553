"""The ``eco_calibrate`` job: ECO's σ search against the served model (SPEC §6), run in a serving replica.

objective(σ) = mean ROUGE-L recall of the gold answers in the greedy replies to (a sample of) the target's forget
questions with ECO applied at σ; the goal is the level replies about an entity the model never saw reach by chance
(``guards.never_seen``: the served model's replies to the same questions about an invented stand-in of the target,
each scored against another item's swapped answer) plus ``GOAL_MARGIN``, unless the target's ``eco.goal`` option sets
it. Only the registration and invented names are used: no other author's data. Scopes are tried least invasive
first: ``entities``, then ``prompt`` only if entity corruption cannot reach the goal at any σ tried (a model that
memorised the rest of the question still answers it).
"""

from __future__ import annotations

import logging
import random
import statistics
import uuid
from dataclasses import replace
from typing import Any

import numpy as np

from classifiers.aliases import AliasMatcher
from classifiers.types import AliasSpan
from guards.base import ComposedPlan, PlanRequest, PromptView, TargetHit, corruption_seed
from guards.job_interface import JobContext, JobHandler, JobResources, JobTarget, ServedModel, registered_options
from guards.eco.corruption import ENTITIES, PROMPT
from guards.eco.sigma_search import SigmaSearchConfig, zeroth_order_sigma_search
from guards.never_seen import RECALL_MARGIN, chance_recall, entity_names, sample_key, stand_ins
from guards.text_metrics import rouge_l_recall

logger = logging.getLogger(__name__)

ECO_NAME = "eco"
ECO_CALIBRATE = "eco_calibrate"
# ROUGE-L over a dozen replies moves by a few hundredths from noise alone; "as if about a stranger" means within this
# margin of that level.
GOAL_MARGIN = RECALL_MARGIN
_NO_EMBEDDINGS = np.zeros((0, 0), dtype=np.float32)


def calibration_job(resources: JobResources) -> JobHandler:
    """The job's handler in a worker that has the served model (a serving replica)."""
    settings = resources.settings
    return EcoCalibrator(resources.served_model(ECO_CALIBRATE), settings.eco_calibration_questions,
                         settings.eco_calibration_max_tokens)


class EcoCalibrator:
    """σ (and the scope) that bring the target's forget answers down to the goal; see the module docstring."""

    def __init__(self, served: ServedModel, questions: int, max_tokens: int,
                 search: SigmaSearchConfig = SigmaSearchConfig()) -> None:
        from guards.eco.mechanism import EcoServing

        self._served = served
        self._eco = EcoServing(served.tokenizer)
        self._questions = questions
        self._max_tokens = max_tokens
        self._search = search

    def __call__(self, context: JobContext) -> dict[str, Any]:
        record = context.target
        options = registered_options(record, ECO_NAME)
        qa = [(item["question"], item["answer"]) for item in record.forget if item.get("question")]
        if not qa:
            raise ValueError("ECO calibration needs question/answer forget items; register eco.sigma instead")
        names, seed = entity_names(record.name, record.aliases), int(options.get("seed", 0))
        sample = random.Random(sample_key(seed, names)).sample(qa, min(self._questions, len(qa)))
        golds = [answer for _, answer in sample]
        matcher = AliasMatcher(record.aliases)
        prompts = [self._served.render_question(question) for question, _ in sample]
        spans = [tuple(replace(span, turn=0) for span in matcher.find(question)) for question, _ in sample]
        tag = f"{context.job_id}-{uuid.uuid4().hex[:8]}"

        def replies(sigma: float | None, chosen: list[PromptView], scope: str = ENTITIES) -> list[str]:
            """Greedy replies with ECO at σ over ``scope``, or unprotected when σ is None."""
            if sigma is None:
                return self._served.greedy_replies(chosen, [None] * len(chosen), self._max_tokens, tag)
            scoped = {**options, "scope": scope, "sigma": sigma}
            plans = [self._plan(prompt, record, prompt_spans, scoped)
                     for prompt, prompt_spans in zip(chosen, spans, strict=True)]
            return self._served.greedy_replies(chosen, plans, self._max_tokens, tag)

        def score(answers: list[str]) -> float:
            return statistics.fmean(rouge_l_recall(answer, gold) for answer, gold in zip(answers, golds))

        context.progress(0.02, "measuring the unprotected model")
        unprotected = score(replies(None, prompts))
        if options.get("goal") is not None:
            goal = float(options["goal"])
        else:
            entity, _ = stand_ins(names, seed)
            stranger = replies(None, [self._served.render_question(entity.swap(q)) for q, _ in sample])
            goal = GOAL_MARGIN + chance_recall(stranger, [entity.swap(gold) for gold in golds])

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

    def _plan(self, prompt: PromptView, record: JobTarget, spans: tuple[AliasSpan, ...],
              options: dict[str, Any]) -> ComposedPlan:
        """ECO alone on one prompt, as the planner would apply it to a hit on this target."""
        hit = TargetHit(record.id, 1.0, spans, tuple(record.aliases), options, {})
        request = PlanRequest(hit=hit, prompt=prompt, query_embeddings=_NO_EMBEDDINGS,
                              seed=corruption_seed(prompt.token_ids, record.id))
        composed = ComposedPlan()
        composed.add(ECO_NAME, self._eco.plan(request))
        return composed
