"""The one request pipeline every inference endpoint goes through.

    render (chat template, tokenize) -> classify (against the registry snapshot) -> plan (each hit target's guards
    contribute, in the fixed guard order) -> engine.generate -> choice events -> finish (metrics, audit record)

Plain async Python with no HTTP in it: the OpenAI layer (``server/serving.py``) turns ``ChoiceEvent``s into responses
or SSE chunks, so streaming and non-streaming share one generation path. With no forget target hit, the plan is the
plain vLLM input (token ids, no extra_args, no LoRA), which keeps unflagged traffic token-identical to plain vLLM; with
no target registered at all, classification is skipped and costs nothing.

Planning happens in ``start``, before any byte of the response exists, and fails closed: a prompt that hit a target
is refused (``GuardFailed``, 503) when no mechanism of that target can be applied or one raises; it is never served
unguarded, and the metrics and the audit record say so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError

from classifiers.types import Hit
from guards.base import ComposedPlan, Guard, PlanRequest, PromptView, TargetHit
from guards.embedding_table import EmbeddingTable
from server.admin_protocol import AuditRecord
from server.audit import AuditWriter
from server.engine import Engine
from server.errors import ContextLengthExceeded, GuardFailed, InvalidRequest, RequestTimeout
from server.metrics import Metrics
from server.registry.snapshot import RegistrySnapshot, SnapshotHolder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model sees it; ``text`` is kept for echo, the classifiers and the guards' token offsets."""

    token_ids: list[int]
    text: str
    conversation: tuple[ChatTurn, ...] = ()
    from_text: bool = True  # False when the client sent token ids
    add_special_tokens: bool = False  # how `text` was encoded (completion strings get the BOS token)

    def view(self) -> PromptView:
        turns = tuple((turn.role, turn.content) for turn in self.conversation) or (("user", self.text),)
        return PromptView(token_ids=self.token_ids, text=self.text, turns=turns, from_text=self.from_text,
                          add_special_tokens=self.add_special_tokens)


@dataclass(frozen=True)
class Classification:
    """Which targets one prompt is about. ``scores`` keeps the best few targets' scores for the audit log."""

    hits: tuple[Hit, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # of the prompt's texts


NO_TARGETS = Classification()
AUDITED_SCORES = 5


@dataclass(frozen=True)
class EnginePlan:
    """Exactly what one engine request receives."""

    prompt: dict[str, Any]
    extra_args: dict[str, Any] | None = None
    lora_request: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (id, text, logprob), best first


@dataclass(frozen=True)
class ChoiceEvent:
    """New output of one choice: the text and tokens produced since the previous event of that choice."""

    index: int
    prompt_index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class Run:
    """One inference request in flight; counters are final once its event stream is exhausted."""

    request_id: str
    endpoint: str
    prompts: list[RenderedPrompt]
    n: int
    snapshot: RegistrySnapshot
    classifications: list[Classification]
    seed: int | None = None
    plans: list[EnginePlan] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)  # applied to any of its prompts, in guard order
    started_at: float = field(default_factory=time.perf_counter)
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.token_ids) for prompt in self.prompts)

    @property
    def hit_target_ids(self) -> list[str]:
        return sorted({hit.target_id for c in self.classifications for hit in c.hits})


class Pipeline:
    """Turns rendered prompts into engine requests and engine outputs into choice events."""

    def __init__(
        self,
        engine: Engine,
        request_timeout_s: float,
        metrics: Metrics,
        registry: SnapshotHolder | None = None,
        audit: AuditWriter | None = None,
        audit_prompts: bool = False,
        guards: Sequence[Guard] = (),
        embeddings: EmbeddingTable | None = None,
    ) -> None:
        self._engine = engine
        self._timeout_s = request_timeout_s
        self._metrics = metrics
        self._registry = registry
        self._audit = audit
        self._audit_prompts = audit_prompts
        self._guards = tuple(guards)
        self._embeddings = embeddings

    # ------------------------------------------------------------ render

    def render_chat(
        self, turns: Sequence[ChatTurn], *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> RenderedPrompt:
        tokenizer = self._engine.tokenizer
        conversation = [{"role": turn.role, "content": turn.content} for turn in turns]
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except (TemplateError, ValueError) as exc:
            raise InvalidRequest(f"The conversation cannot be rendered: {exc}", param="messages") from exc
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        return RenderedPrompt(token_ids=list(token_ids), text=text, conversation=tuple(turns))

    def render_completion(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[RenderedPrompt]:
        tokenizer = self._engine.tokenizer
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            items = [list(prompt)]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        rendered = []
        vocab_size = self._engine.info.vocab_size
        for item in items:
            if isinstance(item, str):
                rendered.append(RenderedPrompt(token_ids=list(tokenizer.encode(item)), text=item,
                                               add_special_tokens=True))
                continue
            if not item:
                raise InvalidRequest("A token-id prompt must not be empty.", param="prompt")
            if any(not 0 <= token < vocab_size for token in item):
                raise InvalidRequest(f"Token ids must lie in [0, {vocab_size}).", param="prompt")
            rendered.append(RenderedPrompt(token_ids=list(item), text=tokenizer.decode(item), from_text=False))
        return rendered

    # ------------------------------------------------------------ plan

    def check_budget(self, prompts: Sequence[RenderedPrompt], max_tokens: int | None, param: str) -> None:
        """Refuse prompts that do not fit the context, as vLLM's server does, but before reaching the engine."""
        limit = self._engine.info.max_model_len
        for prompt in prompts:
            length = len(prompt.token_ids)
            if length >= limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens; the prompt has {length}.",
                    param="messages" if prompt.conversation else "prompt",
                )
            if max_tokens is not None and length + max_tokens > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens; the prompt ({length}) plus "
                    f"{param} ({max_tokens}) exceeds it.",
                    param=param,
                )

    def plan(self, run: Run, index: int) -> EnginePlan:
        """What the engine receives for prompt ``index`` of the run: plain ids unless the prompt hit a target."""
        prompt, classification = run.prompts[index], run.classifications[index]
        if not classification.hits:
            return EnginePlan(prompt={"prompt_token_ids": prompt.token_ids})
        composed = ComposedPlan()
        view = prompt.view()
        protected: set[str] = set()
        for guard in self._guards:
            for hit in classification.hits:
                target = run.snapshot.targets.get(hit.target_id)
                entry = target.mechanisms.get(guard.name) if target is not None else None
                if entry is None or not guard.ready(entry.get("options", {}), entry.get("state") or {}):
                    continue
                request = PlanRequest(
                    hit=TargetHit(hit.target_id, hit.score, hit.alias_spans, tuple(target.aliases),
                                  entry.get("options", {}), entry.get("state") or {}),
                    prompt=view, query_embeddings=classification.embeddings,
                    seed=request_seed(prompt.token_ids, hit.target_id, run.seed),
                )
                try:
                    composed.add(guard.name, guard.plan(request))
                except Exception as exc:
                    self._metrics.guard_failures.labels(guard.name).inc()
                    logger.exception("guard.failed", extra={"request_id": run.request_id, "mechanism": guard.name,
                                                            "target_id": hit.target_id})
                    raise GuardFailed() from exc
                protected.add(hit.target_id)
        unprotected = sorted({hit.target_id for hit in classification.hits} - protected)
        if unprotected:
            self._metrics.guard_failures.labels("none_ready").inc()
            logger.error("guard.none_ready", extra={"request_id": run.request_id, "targets": unprotected})
            raise GuardFailed()
        for name in composed.mechanisms:
            self._metrics.guard_applied.labels(name).inc()
            if name not in run.mechanisms:
                run.mechanisms.append(name)
        return self.engine_plan(prompt, composed)

    def engine_plan(self, prompt: RenderedPrompt, composed: ComposedPlan) -> EnginePlan:
        """Turn the guards' contributions into the engine request (``prompt_embeds`` only if a guard edits them)."""
        extra_args = {"lethe": composed.processor_args} if composed.processor_args else None
        lora = composed.loras[0] if composed.loras else None
        if not composed.embedding_edits:
            return EnginePlan(prompt={"prompt_token_ids": prompt.token_ids}, extra_args=extra_args, lora_request=lora)
        if self._embeddings is None:
            raise GuardFailed()
        embeds = self._embeddings.lookup(prompt.token_ids)  # (T, hidden)
        for edit in composed.embedding_edits:
            edit.apply(embeds)
        self._check_embeds(embeds, len(prompt.token_ids))
        # The ids travel with the embeds so the logits processor still sees the prompt; the all-False mask is what
        # makes vLLM use the embeds instead of silently re-embedding the ids (VLLM_NOTES §2).
        engine_prompt = {"prompt_embeds": embeds, "prompt_token_ids": list(prompt.token_ids),
                         "prompt_is_token_ids": [False] * len(prompt.token_ids)}
        return EnginePlan(prompt=engine_prompt, extra_args=extra_args, lora_request=lora)

    def _check_embeds(self, embeds: torch.Tensor, length: int) -> None:
        """A malformed tensor would kill vLLM's EngineCore (VLLM_NOTES §2): check it here, and refuse instead."""
        info = self._engine.info
        if (embeds.ndim != 2 or embeds.shape != (length, info.hidden_size) or embeds.dtype != info.dtype
                or not bool(torch.isfinite(embeds).all())):
            logger.error("guard.bad_embeds", extra={"shape": list(embeds.shape), "dtype": str(embeds.dtype)})
            raise GuardFailed()

    # ------------------------------------------------------------ generate

    async def start(
        self, request_id: str, endpoint: str, prompts: list[RenderedPrompt], n: int, seed: int | None = None
    ) -> Run:
        """Classify and plan the prompts against the current registry snapshot, which the run keeps to its end."""
        snapshot = self._registry.current if self._registry is not None else RegistrySnapshot(revision=0)
        classifications = [await self._classify(snapshot, prompt) for prompt in prompts]
        run = Run(request_id=request_id, endpoint=endpoint, prompts=prompts, n=n, snapshot=snapshot,
                  classifications=classifications, seed=seed)
        for target_id in run.hit_target_ids:
            self._metrics.target_hits.labels(target_id).inc()
        try:
            run.plans = [self.plan(run, index) for index in range(len(prompts))]
        except GuardFailed:
            self.finish(run, "guard_failed")
            raise
        return run

    async def _classify(self, snapshot: RegistrySnapshot, prompt: RenderedPrompt) -> Classification:
        if snapshot.bank is None:
            return NO_TARGETS
        turns = [(turn.role, turn.content) for turn in prompt.conversation] or [("user", prompt.text)]
        result = await asyncio.to_thread(snapshot.bank.score, turns)
        self._metrics.classifier_latency.observe(result.total_seconds)
        best = sorted(result.scores.items(), key=lambda item: -item[1])[:AUDITED_SCORES]
        hits = tuple(result.hits)
        scores = {target_id: round(score, 4) for target_id, score in best}
        scores.update({hit.target_id: round(hit.score, 4) for hit in hits})
        return Classification(hits=hits, scores=scores, seconds=result.total_seconds, embeddings=result.embeddings)

    async def generate_text(self, plan: EnginePlan, max_tokens: int, request_id: str) -> str:
        """One greedy reply to an already planned prompt, for the server's own measurements (ECO calibration)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
        if plan.extra_args is not None:
            params.extra_args = plan.extra_args
        text = ""
        async for output in self._engine.generate(plan.prompt, params, request_id, plan.lora_request):
            text = output.outputs[0].text
        return text

    def finish(self, run: Run, outcome: str = "served") -> None:
        """Account for a finished (or failed) run: metrics, a structured log line and its audit record."""
        elapsed = time.perf_counter() - run.started_at
        self._metrics.prompt_tokens.inc(run.prompt_tokens)
        self._metrics.completion_tokens.inc(run.completion_tokens)
        self._metrics.latency.labels(run.endpoint).observe(elapsed)
        if run.first_token_at is not None:
            self._metrics.ttft.labels(run.endpoint).observe(run.first_token_at - run.started_at)
        targets = run.hit_target_ids
        logger.info("request.done", extra={
            "request_id": run.request_id, "endpoint": run.endpoint, "outcome": outcome, "targets": targets,
            "mechanisms": run.mechanisms, "registry_revision": run.snapshot.revision, "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens, "latency_s": round(elapsed, 4)})
        if self._audit is not None:
            scores: dict[str, float] = {}
            for classification in run.classifications:
                for target_id, score in classification.scores.items():
                    scores[target_id] = max(score, scores.get(target_id, 0.0))
            prompt_text = "\n".join(p.text for p in run.prompts) if self._audit_prompts else None
            self._audit.record(AuditRecord(request_id=run.request_id, created=run.created, endpoint=run.endpoint,
                                           targets=targets, mechanisms=list(run.mechanisms), scores=scores, outcome=outcome,
                                           prompt=prompt_text))

    async def events(self, run: Run, params: Any) -> AsyncIterator[ChoiceEvent]:
        """All choices' events, interleaved as the engine produces them; ends when every choice has finished."""
        from vllm.utils.async_utils import merge_async_iterators

        streams = []
        for prompt_index, (prompt, plan) in enumerate(zip(run.prompts, run.plans, strict=True)):
            prompt_params = params.clone()
            if prompt_params.max_tokens is None:
                prompt_params.max_tokens = self._engine.info.max_model_len - len(prompt.token_ids)
            if plan.extra_args is not None:
                prompt_params.extra_args = plan.extra_args
            engine_id = run.request_id if len(run.prompts) == 1 else f"{run.request_id}-{prompt_index}"
            streams.append(self._engine.generate(plan.prompt, prompt_params, engine_id, plan.lora_request))

        merged = merge_async_iterators(*streams)
        try:
            async with asyncio.timeout(self._timeout_s):
                async for prompt_index, output in merged:
                    for completion in output.outputs:
                        event = _choice_event(completion, prompt_index, run.n)
                        run.completion_tokens += len(event.token_ids)
                        if run.first_token_at is None and event.token_ids:
                            run.first_token_at = time.perf_counter()
                        yield event
        except TimeoutError as exc:
            raise RequestTimeout() from exc
        finally:
            await merged.aclose()


def request_seed(token_ids: Sequence[int], target_id: str, seed: int | None) -> int:
    """A seed that is the same for the same prompt, target and client seed: guarded replies are reproducible."""
    digest = hashlib.sha256(f"{target_id}|{seed}|{','.join(map(str, token_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _choice_event(completion: Any, prompt_index: int, n: int) -> ChoiceEvent:
    logprobs = None
    if completion.logprobs is not None:
        logprobs = tuple(
            _token_logprob(token_id, step) for token_id, step in zip(completion.token_ids, completion.logprobs)
        )
    return ChoiceEvent(
        index=prompt_index * n + completion.index,
        prompt_index=prompt_index,
        text=completion.text,
        token_ids=tuple(completion.token_ids),
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )


def _token_logprob(token_id: int, step: dict[int, Any]) -> TokenLogprob:
    """vLLM gives the sampled token plus the top-k, keyed by id; rank orders the alternatives."""
    chosen = step[token_id]
    ranked = sorted(step.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 30))
    top = tuple((tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in ranked)
    return TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=float(chosen.logprob), top=top)
