"""Scoring answers under the guards: the log-probability of a given continuation as the protected model sees it.

TOFU's metrics (truth ratio, Forget Quality, Model Utility's probability) need the probability of fixed answers, and
vLLM's prompt logprobs are computed before any logits processor runs: they would score the unprotected model. So the
evaluation scores on this in-process path instead, from the very ``EnginePlan`` the planner made for the prompt:

- the prompt goes in as the plan has it: token ids, or ECO's corrupted ``prompt_embeds`` (answer tokens are embedded
  plainly, as the engine embeds generated tokens);
- O3's stacked LoRA, when the plan carries one, is the adapter PEFT applies to the HF copy of the model;
- each answer position's logits pass through the same row hooks the engine's logits processor builds
  (``guards.processor.build_row_hooks``: GUARD's bans, then ULD's difference), fed the answer token by token exactly
  as they would see sampled tokens.

The HF copy of the served weights is loaded on first use: scoring is for evaluation, and a serving replica that never
scores never pays for it. A token a guard banned has log-probability −inf; it is floored at ``LOGPROB_FLOOR`` so that
losses and truth ratios stay finite.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guards.processor import EXTRA_ARGS_KEY, RowHookError, build_row_hooks, row_hook_resources
from server.errors import GuardFailed
from server.pipeline import Pipeline
from server.planner import ChatTurn, EnginePlan
from server.run import ChatPrompt, RunRequest

logger = logging.getLogger(__name__)

LOGPROB_FLOOR = -100.0  # a guard's ban (-inf) scores as e^-100: far below any real token, finite for the metrics
CACHED_ADAPTERS = 2  # O3 stacks are one per registry revision; the newest two cover a revision change mid-evaluation


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token log-probabilities of one continuation after one prompt."""

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def mean_loss(self) -> float:
        """Length-normalised negative log-likelihood: TOFU's per-answer loss."""
        return -self.logprob / max(1, len(self.token_logprobs))


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


class GuardedScorer:
    """Scores continuations of planned prompts on an HF copy of the served model, guards applied."""

    def __init__(self, model_dir: Path, tokenizer: Any) -> None:
        self._model_dir = Path(model_dir)
        self._tokenizer = tokenizer
        self._model: Any = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter path -> PEFT adapter name
        self._adapter_names = itertools.count()
        self._lock = threading.Lock()
        self._hook_resources = row_hook_resources(tokenizer)

    def score(self, plan: EnginePlan, continuation_ids: Sequence[int]) -> ContinuationScore:
        """Teacher-forced log-probabilities of ``continuation_ids`` after the plan's prompt (one forward pass)."""
        if not continuation_ids:
            raise ValueError("a continuation needs at least one token")
        prompt_ids = list(plan.prompt["prompt_token_ids"])
        answer = list(continuation_ids)
        with self._lock, torch.inference_mode():
            model = self._model_for(plan)
            logits = self._answer_logits(model, plan, prompt_ids, answer)  # (A, V)
            section = (plan.extra_args or {}).get(EXTRA_ARGS_KEY)
            output: list[int] = []  # grows token by token, as the engine's live output list does
            hooks = build_row_hooks(section, prompt_ids, output, self._hook_resources) if section else []
            logprobs: list[float] = []
            for position, token in enumerate(answer):
                row = logits[position].clone()
                for hook in hooks:
                    hook.apply(row)
                value = float(torch.log_softmax(row, dim=-1)[token])
                logprobs.append(max(value, LOGPROB_FLOOR))
                output.append(token)
        return ContinuationScore(tuple(answer), tuple(logprobs))

    def _answer_logits(self, model: Any, plan: EnginePlan, prompt_ids: list[int], answer: list[int]) -> torch.Tensor:
        """The logits that predict each answer token: positions P-1 .. P+A-2 of the joint sequence."""
        embeds = plan.prompt.get("prompt_embeds")
        if embeds is None:
            out = model(input_ids=torch.tensor([prompt_ids + answer]))
        else:
            answer_embeds = model.get_input_embeddings()(torch.tensor(answer))  # (A, hidden)
            joint = torch.cat([embeds.to(answer_embeds.dtype), answer_embeds], dim=0)  # (P+A, hidden)
            out = model(inputs_embeds=joint.unsqueeze(0))
        start = len(prompt_ids) - 1
        return out.logits[0, start:start + len(answer)].float()

    def _model_for(self, plan: EnginePlan) -> Any:
        """The HF model with the plan's LoRA active, or with every adapter disabled when it has none."""
        base = self._load()
        lora = plan.lora_request
        if lora is None:
            if hasattr(base, "disable_adapter_layers"):
                base.disable_adapter_layers()
            return base
        path = str(lora.lora_path)
        if path not in self._adapters:
            self._model = base = self._load_adapter(base, path)
        self._adapters.move_to_end(path)
        base.enable_adapter_layers()
        base.set_adapter(self._adapters[path])
        return base

    def _load(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=torch.float32).eval()
            logger.info("scoring.model_loaded", extra={"model": str(self._model_dir)})
        return self._model

    def _load_adapter(self, base: Any, path: str) -> Any:
        from peft import PeftModel

        name = f"stack{next(self._adapter_names)}"
        if isinstance(base, PeftModel):
            base.load_adapter(path, adapter_name=name)
        else:
            base = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
        self._adapters[path] = name
        while len(self._adapters) > CACHED_ADAPTERS:
            _, evicted = self._adapters.popitem(last=False)
            base.delete_adapter(evicted)
        logger.info("scoring.adapter_loaded", extra={"path": path})
        return base


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
