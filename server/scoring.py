"""``POST /admin/v1/score``: the log-probability of given continuations of a chat as the protected model sees it.

The request is rendered, classified and planned exactly as an inference request is, then each continuation is scored
by ``server.guarded_scorer.GuardedScorer`` under the plan's guards (vLLM's own prompt logprobs are computed before the
logits processor and would score the unprotected model).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guards.row_hooks import RowHookError
from server.errors import GuardFailed
from server.guarded_scorer import ContinuationScore, GuardedScorer
from server.pipeline import Pipeline
from server.planner import ChatTurn
from server.run import ChatPrompt, RunRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredContinuation:
    tokens: list[str]  # each token's text, as OpenAI logprobs show it
    score: ContinuationScore


@dataclass(frozen=True)
class ScoredPrompt:
    """One scoring run: the targets the prompt hit, the mechanisms applied (in guard order), each continuation."""

    targets: list[str]
    mechanisms: list[str]
    continuations: list[ScoredContinuation]


class ScoringService:
    """``POST /admin/v1/score``: render the chat, classify and plan it as the pipeline does, score each continuation.

    The run is accounted (metrics, audit record with endpoint ``score``) like any inference request, so an
    evaluation's hits show up in the audit trail alongside served traffic.
    """

    def __init__(self, pipeline: Pipeline, scorer: GuardedScorer, tokenizer: Any) -> None:
        self._pipeline = pipeline
        self._scorer = scorer
        self._tokenizer = tokenizer

    async def score(self, messages: Sequence[ChatTurn],
                    continuations: Sequence[str | Sequence[int]]) -> ScoredPrompt:
        """Score each continuation (text, or the token ids a reply was generated as) after the chat ``messages``."""
        token_ids = [self._token_ids(continuation) for continuation in continuations]
        run = await self._pipeline.start(RunRequest(
            endpoint="score", request_id=f"score-{uuid.uuid4().hex}", prompt=ChatPrompt(tuple(messages)),
            max_tokens=max(len(ids) for ids in token_ids), budget_param="continuations"))
        plan = run.plans[0]
        async with run:
            scores = []
            for ids in token_ids:
                try:
                    result = await asyncio.to_thread(self._scorer.score, plan, ids)
                except RowHookError as exc:
                    logger.exception("scoring.guard_failed", extra={"request_id": run.request_id})
                    raise GuardFailed() from exc
                scores.append(ScoredContinuation([self._tokenizer.decode([token]) for token in ids], result))
        return ScoredPrompt(targets=run.hit_target_ids, mechanisms=list(run.mechanisms), continuations=scores)

    def _token_ids(self, continuation: str | Sequence[int]) -> list[int]:
        if isinstance(continuation, str):
            return list(self._tokenizer.encode(continuation, add_special_tokens=False))
        self._pipeline.check_token_ids(continuation, "continuations")
        return list(continuation)
