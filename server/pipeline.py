"""The one request pipeline every inference endpoint goes through.

    render (chat template, tokenize) -> classify (against the registry snapshot, batched across concurrent requests)
    -> plan (each hit target's mechanisms contribute, in their fixed order) -> engine.generate -> choice events
    -> finish (metrics, audit record)

An endpoint calls ``start`` once with a ``RunRequest`` and drives the ``Run`` it gets back as a context manager
(``server/run.py``), which finishes it exactly once. Plain async Python with no HTTP in it: the OpenAI layer
(``server/openai/serving.py``) turns ``ChoiceEvent``s into responses or SSE chunks, so streaming and non-streaming
share one generation path; scoring (``server/scoring.py``) runs the same lifecycle. With no forget target hit, the
plan is the plain vLLM input (token ids, no extra_args, no LoRA), which keeps unflagged traffic token-identical to
plain vLLM; with no target registered at all, classification is skipped and costs nothing. With targets registered
and ``LETHE_SPECULATIVE_PREFILL`` on (off by default), each prompt's plain request is submitted while the prompt is
classified, and kept only if its plan turns out plain (``server/speculation.py``): classification then overlaps the
prefill instead of preceding it.

Rendering and tokenising run on one worker thread of the pipeline's own (as vLLM's server does: a fast tokenizer is
not safe to share across threads that change its settings), never on the event loop: a long conversation or a batch
of prompts delays other requests' rendering, not every stream and health check the replica serves.

A prompt the gate could read only in part (more text windows than ``LETHE_GATE_MAX_WINDOWS``) is refused with a 400
before classification, as one over the context length is.

Planning happens in ``start``, before any byte of the response exists, and fails closed: a prompt that hit a target
none of whose mechanisms is ready gets interim protection, and is refused (``GuardFailed``, 503) when a mechanism
raises or no protection at all can be applied; it is never served unguarded, and the metrics and the audit record say
so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from jinja2 import TemplateError

from classifiers.conversation import count_texts
from classifiers.types import Hit
from guards.base import InterimGuard, Mechanism, MechanismServing
from guards.chat import encode_rendered, render_chat
from server.audit import AuditWriter
from server.classifier_batcher import ClassificationBatcher
from server.engine import Engine
from server.errors import (ContextLengthExceeded, GuardFailed, InvalidRequest, PromptTooLongForGate,
                           RegistryUnavailable, RequestTimeout)
from server.planner import NO_TARGETS, ChatTurn, Classification, EnginePlan, Planner, RenderedPrompt, plain_plan
from server.metrics import Metrics
from server.prompt_embeds import EmbeddingTable
from server.registry.records import AuditEntry
from server.registry.snapshot import RegistrySnapshot, SnapshotHolder
from server.run import (ChatPrompt, ChoiceEvent, CompletionPrompt, Run, RunRequest, TokenLogprob,
                        completion_items)
from server.speculation import PlainStart

logger = logging.getLogger(__name__)


AUDITED_SCORES = 5


def check_in_vocabulary(token_ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Token ids a client sends must name tokens of the served vocabulary (else the engine would fail: a 500)."""
    if any(not 0 <= token < vocab_size for token in token_ids):
        raise InvalidRequest(f"`{param}` token ids must lie in [0, {vocab_size}).", param=param)


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
        mechanisms: Sequence[Mechanism] = (),
        servings: Mapping[str, MechanismServing] | None = None,
        embeddings: EmbeddingTable | None = None,
        interim: InterimGuard | None = None,
        speculate: bool = False,
    ) -> None:
        self._engine = engine
        self._timeout_s = request_timeout_s
        self._metrics = metrics
        self._registry = registry
        self._audit = audit
        self._audit_prompts = audit_prompts
        self.planner = Planner(mechanisms, servings or {}, embeddings, engine, metrics, interim)
        self._classifier = ClassificationBatcher(on_batch=metrics.classifier_batch_size.observe)
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lethe-render")
        # Start each prompt plainly while it is classified (server/speculation.py); the benchmarks switch it per path.
        self.speculate = speculate

    def close(self) -> None:
        """Stop the rendering thread (a render in progress finishes; queued ones are dropped)."""
        self._renderer.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ render

    def render_chat(
        self, turns: Sequence[ChatTurn], *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> RenderedPrompt:
        tokenizer = self._engine.tokenizer
        try:
            text = render_chat(tokenizer, [(turn.role, turn.content) for turn in turns],
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message)
        except (TemplateError, ValueError) as exc:
            raise InvalidRequest(f"The conversation cannot be rendered: {exc}", param="messages") from exc
        token_ids = encode_rendered(tokenizer, text)
        return RenderedPrompt(token_ids=list(token_ids), text=text, conversation=tuple(turns))

    def render_completion(self, prompt: CompletionPrompt) -> list[RenderedPrompt]:
        tokenizer = self._engine.tokenizer
        rendered = []
        for item in completion_items(prompt):
            if isinstance(item, str):
                rendered.append(RenderedPrompt(token_ids=list(tokenizer.encode(item)), text=item,
                                               add_special_tokens=True))
                continue
            self.check_token_ids(item, "prompt")
            rendered.append(RenderedPrompt(token_ids=list(item), text=tokenizer.decode(item), from_text=False))
        return rendered

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        """A client's token-id sequence: not empty, and within the served vocabulary."""
        if not token_ids:
            raise InvalidRequest("A token-id sequence must not be empty.", param=param)
        check_in_vocabulary(token_ids, self._engine.info.vocab_size, param)

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

    def check_gate_input(self, prompts: Sequence[RenderedPrompt], snapshot: RegistrySnapshot) -> None:
        """Refuse a prompt the gate could read only in part (more windows than its bank embeds), before it joins a
        classification batch: a batch fails as a whole, and one oversized request must not fail the others."""
        if snapshot.bank is None:
            return
        limit = snapshot.bank.max_texts
        for prompt in prompts:
            needed = count_texts(prompt.view().turns)
            if needed > limit:
                raise PromptTooLongForGate(needed, limit, param="messages" if prompt.conversation else "prompt")

    def plan(self, run: Run, index: int) -> EnginePlan:
        """What the engine receives for prompt ``index`` of the run (see ``server/planner.py``)."""
        plan = self.planner.plan(run.prompts[index], run.classifications[index], run.snapshot, run.request_id)
        run.mechanisms.extend(name for name in plan.mechanisms if name not in run.mechanisms)
        return plan

    # ------------------------------------------------------------ generate

    async def start(self, request: RunRequest) -> Run:
        """Render the request's prompts, check they fit, classify and plan them against the current registry snapshot
        (which the run keeps to its end). A refusal after classification is accounted (``guard_failed``) before it
        raises; the caller drives the returned run as a context manager (``server/run.py``)."""
        snapshot = self._registry.current if self._registry is not None else RegistrySnapshot(revision=0)
        if not snapshot.loaded:  # no registry read yet: any prompt could be about a target, so none is served
            raise RegistryUnavailable("The server is not ready yet; please retry later.")
        prompts = await asyncio.get_running_loop().run_in_executor(self._renderer, self._render, request.prompt)
        self.check_budget(prompts, request.max_tokens, request.budget_param)
        self.check_gate_input(prompts, snapshot)
        run = Run(request_id=request.request_id, endpoint=request.endpoint, prompts=prompts, n=request.n,
                  snapshot=snapshot, generate=self._generate, on_finish=self._account, audited=request.audited,
                  params=request.params)
        speculative = (self._start_plain(run) if self.speculate and snapshot.bank is not None
                       and self.planner.may_be_plain(snapshot) else {})
        try:
            await self._classify_and_plan(run)
        except BaseException:
            await _discard(speculative.values())
            self._metrics.speculative_prefills.labels("discarded").inc(len(speculative))
            raise
        run.plain_starts = {index: start for index, start in speculative.items() if run.plans[index].plain}
        await _discard(start for index, start in speculative.items() if index not in run.plain_starts)
        if speculative:
            self._metrics.speculative_prefills.labels("kept").inc(len(run.plain_starts))
            self._metrics.speculative_prefills.labels("discarded").inc(len(speculative) - len(run.plain_starts))
        return run

    async def _classify_and_plan(self, run: Run) -> None:
        try:
            run.classifications = list(await asyncio.gather(*(self._classify(run.snapshot, p) for p in run.prompts)))
        except Exception as exc:  # an unclassified prompt may be about a target: refuse it, never serve it plain
            logger.exception("classifier.failed", extra={"request_id": run.request_id})
            self._metrics.guard_failures.labels("classifier").inc()
            run.finish("guard_failed")
            raise GuardFailed() from exc
        if run.hit_target_ids:
            self._metrics.target_hits.inc()
        try:
            run.plans = [self.plan(run, index) for index in range(len(run.prompts))]
        except GuardFailed:
            run.finish("guard_failed")
            raise

    def _start_plain(self, run: Run) -> dict[int, PlainStart]:
        """Each prompt's plain engine request, submitted before its classification is known (``server/speculation.py``);
        none for a run without sampling parameters."""
        starts: dict[int, PlainStart] = {}
        if run.params is None:
            return starts
        for index, prompt in enumerate(run.prompts):
            plan = plain_plan(prompt)
            starts[index] = PlainStart(self._engine.generate(plan.prompt, self._engine_params(run, index, plan),
                                                             self._engine_id(run, index)))
        return starts

    def _render(self, prompt: ChatPrompt | CompletionPrompt) -> list[RenderedPrompt]:
        if isinstance(prompt, ChatPrompt):
            return [self.render_chat(prompt.turns, add_generation_prompt=prompt.add_generation_prompt,
                                     continue_final_message=prompt.continue_final_message)]
        return self.render_completion(prompt)

    async def _classify(self, snapshot: RegistrySnapshot, prompt: RenderedPrompt) -> Classification:
        if snapshot.bank is None:
            return NO_TARGETS
        queued_at = time.perf_counter()
        result = await self._classifier.score(snapshot.bank, prompt.view().turns)
        seconds = time.perf_counter() - queued_at  # what the request waited: its batch and any batch before it
        self._metrics.classifier_latency.observe(seconds)
        best = sorted(result.scores.items(), key=lambda item: -item[1])[:AUDITED_SCORES]
        hits = tuple(result.hits)
        for gate, bank in snapshot.gates.items():
            hits = with_gate(hits, gate, bank.open_gates(result.embeddings))
        scores = {target_id: round(score, 4) for target_id, score in best}
        scores.update({hit.target_id: round(hit.score, 4) for hit in hits})
        return Classification(hits=hits, scores=scores, seconds=seconds, embeddings=result.embeddings)

    @property
    def serving_revision(self) -> int:
        """The registry revision of the live snapshot new requests are planned against."""
        return self._registry.current.revision if self._registry is not None else 0

    async def generate_text(self, plan: EnginePlan, max_tokens: int, request_id: str) -> str:
        """One greedy reply to an already planned prompt, for the server's own measurements (ECO calibration, the
        erasure report's unprotected replies)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
        if plan.extra_args is not None:
            params.extra_args = plan.extra_args
        text = ""
        async for output in self._engine.generate(plan.prompt, params, request_id, plan.lora_request):
            text = output.outputs[0].text
        return text

    def _account(self, run: Run, outcome: str) -> None:
        """A finished (or failed) run's metrics, structured log line and audit record (``Run.finish`` calls it once)."""
        elapsed = time.perf_counter() - run.started_at
        self._metrics.prompt_tokens.inc(run.prompt_tokens)
        self._metrics.completion_tokens.inc(run.completion_tokens)
        self._metrics.latency.labels(run.endpoint).observe(elapsed)
        if run.first_token_at is not None:
            self._metrics.ttft.labels(run.endpoint).observe(run.first_token_at - run.started_at)
        targets = run.hit_target_ids
        logger.info("request.done", extra={
            "request_id": run.request_id, "endpoint": run.endpoint, "outcome": outcome, "targets": targets,
            "mechanisms": run.mechanisms, "registry_revision": run.snapshot.revision,
            "prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
            "latency_s": round(elapsed, 4)})
        if self._audit is not None and run.audited:
            scores: dict[str, float] = {}
            for classification in run.classifications:
                for target_id, score in classification.scores.items():
                    scores[target_id] = max(score, scores.get(target_id, 0.0))
            prompt_text = "\n".join(p.text for p in run.prompts) if self._audit_prompts else None
            self._audit.record(AuditEntry(request_id=run.request_id, created=run.created, endpoint=run.endpoint,
                                          targets=targets, mechanisms=list(run.mechanisms), scores=scores,
                                          outcome=outcome, prompt=prompt_text))

    def _engine_params(self, run: Run, index: int, plan: EnginePlan) -> Any:
        """The request's sampling parameters for prompt ``index`` under ``plan``."""
        params = run.params.clone()
        if params.max_tokens is None:
            params.max_tokens = self._engine.info.max_model_len - len(run.prompts[index].token_ids)
        if plan.extra_args is not None:
            params.extra_args = plan.extra_args
        return params

    @staticmethod
    def _engine_id(run: Run, index: int) -> str:
        return run.request_id if len(run.prompts) == 1 else f"{run.request_id}-{index}"

    async def _generate(self, run: Run) -> AsyncIterator[ChoiceEvent]:
        """All choices' events, interleaved as the engine produces them; ends when every choice has finished
        (``Run.events``). A prompt whose plain request was started while it was classified continues that one."""
        from vllm.utils.async_utils import merge_async_iterators

        streams = []
        for index, plan in enumerate(run.plans):
            started = run.plain_starts.get(index)
            streams.append(started.stream() if started is not None else self._engine.generate(
                plan.prompt, self._engine_params(run, index, plan), self._engine_id(run, index), plan.lora_request))

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


async def _discard(starts: Iterable[PlainStart]) -> None:
    for start in starts:
        await start.discard()


def with_gate(hits: tuple[Hit, ...], gate: str, opened: dict[str, float]) -> tuple[Hit, ...]:
    """The hits with a mechanism's own gate's openings added: marked on a hit target, or a new hit scored by it."""
    merged = [replace(hit, gates=hit.gates | {gate}) if hit.target_id in opened else hit for hit in hits]
    known = {hit.target_id for hit in hits}
    merged.extend(Hit(tid, w, gates=frozenset({gate})) for tid, w in sorted(opened.items()) if tid not in known)
    return tuple(merged)


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


LOGPROB_FLOOR = -9999.0  # what vLLM's server reports for a logprob JSON cannot carry (-inf)


def _token_logprob(token_id: int, step: dict[int, Any]) -> TokenLogprob:
    """vLLM gives the sampled token plus the top-k, keyed by id; rank orders the alternatives.

    The values are the engine's *processed* logprobs (after Lethe's guards, penalties, temperature, top-k/top-p), so a
    token a guard banned has −inf. Such a token is never listed among the alternatives, on any request: an entry at
    −inf would name a banned token whenever fewer than ``top_logprobs`` tokens remain possible. The list then holds
    only tokens the request could have produced, and may be shorter than asked, as it is for any request whose
    ``top_k`` or ``top_p`` leaves fewer candidates.
    """
    chosen = step[token_id]
    ranked = sorted(step.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 30))
    top = tuple((tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in ranked if math.isfinite(lp.logprob))
    value = float(chosen.logprob)
    return TokenLogprob(token_id=token_id, token=chosen.decoded_token or "",
                        logprob=value if math.isfinite(value) else LOGPROB_FLOOR, top=top)
