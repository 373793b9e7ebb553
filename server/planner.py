"""Planning: what the engine receives for one rendered prompt, given which targets it is about.

Each mechanism has a gate (``Mechanism.gate``): the prompt classifier, a detector of the mechanism's own (O3's OOD
gate), or every request (ULD's ``gate: always``). For every target whose gate for one of its mechanisms opened, each
such ready mechanism contributes its part, in the fixed mechanism order (``guards/mechanisms.py``). A prompt no gate
opened for gets the plain vLLM input (token ids, no extra_args, no LoRA).

A target is obliged protection when a gate of one of its mechanisms opened, or when it was hit before its own gates
exist (its classifier not fitted: the bank's alias-only detection). An obliged target none of whose gated mechanisms
is ready gets interim protection (``guards.base.InterimGuard``, computed with the snapshot), recorded as ``interim``:
a refusal would tell the client who is registered. Planning still fails closed with ``GuardFailed`` (503), never
serving the prompt unguarded, when a ready mechanism raises, or when an obliged target has no interim protection
either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from classifiers.types import ALWAYS_GATE, Hit
from guards.base import (ComposedPlan, InterimGuard, Mechanism, MechanismServing, NotReady, PlanRequest, PromptView,
                         TargetHit, corruption_seed)
from server.engine import Engine
from server.errors import GuardFailed
from server.metrics import Metrics
from server.prompt_embeds import EmbeddingTable
from server.registry.snapshot import RegistrySnapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model sees it; ``text`` is kept for echo, the classifiers and the mechanisms' token
    offsets."""

    token_ids: list[int]
    text: str
    conversation: tuple[ChatTurn, ...] = ()
    from_text: bool = True  # False when the client sent token ids
    add_special_tokens: bool = False  # how `text` was encoded (completion strings get the BOS token)

    @classmethod
    def from_view(cls, prompt: PromptView) -> RenderedPrompt:
        """The inverse of ``view``: a prompt a mechanism's job rendered, back as the planner takes it."""
        return cls(token_ids=list(prompt.token_ids), text=prompt.text,
                   conversation=tuple(ChatTurn(role, content) for role, content in prompt.turns),
                   from_text=prompt.from_text, add_special_tokens=prompt.add_special_tokens)

    def view(self) -> PromptView:
        turns = tuple((turn.role, turn.content) for turn in self.conversation) or (("user", self.text),)
        return PromptView(token_ids=self.token_ids, text=self.text, turns=turns, from_text=self.from_text,
                          add_special_tokens=self.add_special_tokens)


@dataclass(frozen=True)
class Classification:
    """Which targets one prompt is about (and by which detector). ``scores`` keeps the best few for the audit log."""

    hits: tuple[Hit, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # of the prompt's texts


NO_TARGETS = Classification()


@dataclass(frozen=True)
class EnginePlan:
    """Exactly what one engine request receives."""

    prompt: dict[str, Any]
    extra_args: dict[str, Any] | None = None
    lora_request: Any = None
    mechanisms: tuple[str, ...] = ()  # applied, in mechanism order

    @property
    def plain(self) -> bool:
        """What plain vLLM would receive: the token ids alone, no extra_args, no LoRA."""
        return self.extra_args is None and self.lora_request is None and set(self.prompt) == {"prompt_token_ids"}


def plain_plan(prompt: RenderedPrompt) -> EnginePlan:
    """The engine request of a prompt no mechanism applies to."""
    return EnginePlan(prompt={"prompt_token_ids": prompt.token_ids})


class Planner:
    """Turns a classified prompt into its engine request through the mechanisms."""

    def __init__(self, mechanisms: Sequence[Mechanism], servings: Mapping[str, MechanismServing],
                 embeddings: EmbeddingTable | None, engine: Engine, metrics: Metrics,
                 interim: InterimGuard | None = None) -> None:
        self.mechanisms = tuple(mechanism for mechanism in mechanisms if mechanism.name in servings)
        self._servings = dict(servings)
        self._interim = interim
        self._embeddings = embeddings
        self._engine = engine
        self._metrics = metrics
        self._always: tuple[int, tuple[Hit, ...]] = (-2, ())

    def plan(self, prompt: RenderedPrompt, classification: Classification, snapshot: RegistrySnapshot,
             request_id: str) -> EnginePlan:
        """The engine request for one prompt. It depends on the prompt, its classification and the snapshot only: the
        client's sampling ``seed`` never reaches a mechanism (``guards.base.corruption_seed``)."""
        candidates = self._candidates(classification.hits, snapshot)
        if not candidates:
            return plain_plan(prompt)
        composed = ComposedPlan()
        view = prompt.view()
        gated: set[str] = {hit.target_id for hit in candidates if ALWAYS_GATE not in hit.gates
                           and hit.target_id in snapshot.targets
                           and not snapshot.targets[hit.target_id].classifier_ready}  # hit before its gates exist
        protected: set[str] = set()
        for mechanism in self.mechanisms:
            for hit in candidates:
                target = snapshot.targets.get(hit.target_id)
                entry = target.mechanisms.get(mechanism.name) if target is not None else None
                if entry is None:
                    continue
                options, state = entry.get("options", {}), entry.get("state") or {}
                gate = mechanism.gate(options)
                if gate != ALWAYS_GATE and gate not in hit.gates:
                    continue
                if ALWAYS_GATE not in hit.gates:  # opened by a detector; an always-gate alone obliges nothing
                    gated.add(hit.target_id)
                if not mechanism.ready(options, state):
                    continue
                request = PlanRequest(
                    hit=TargetHit(hit.target_id, hit.score, hit.alias_spans, tuple(target.aliases), options, state),
                    prompt=view, query_embeddings=classification.embeddings,
                    seed=corruption_seed(prompt.token_ids, hit.target_id),
                    shared=snapshot.shared.get(mechanism.name),
                )
                try:
                    composed.add(mechanism.name, self._servings[mechanism.name].plan(request))
                except NotReady:  # not servable here yet (ULD's assistant loading): as if not ready, never refused
                    continue
                except Exception as exc:
                    self._metrics.guard_failures.labels(mechanism.name).inc()
                    logger.exception("guard.failed", extra={"request_id": request_id, "mechanism": mechanism.name,
                                                            "target_id": hit.target_id})
                    raise GuardFailed() from exc
                protected.add(hit.target_id)
        for target_id in sorted(gated - protected):
            self._add_interim(composed, target_id, snapshot, view, request_id)
        for name in composed.mechanisms:
            self._metrics.guard_applied.labels(name).inc()
        if not composed.mechanisms:
            return EnginePlan(prompt={"prompt_token_ids": prompt.token_ids})
        return self.engine_plan(prompt, composed)

    def _add_interim(self, composed: ComposedPlan, target_id: str, snapshot: RegistrySnapshot, prompt: PromptView,
                     request_id: str) -> None:
        """Interim protection for an obliged target none of whose gated mechanisms is ready; refuse if it has none."""
        prepared = snapshot.interim.get(target_id)
        if self._interim is None or prepared is None:
            self._metrics.guard_failures.labels("none_ready").inc()
            logger.error("guard.none_ready", extra={"request_id": request_id, "target_id": target_id})
            raise GuardFailed()
        try:
            composed.add(self._interim.name, self._interim.plan(prepared, prompt), self._interim.row_hook_key)
        except Exception as exc:
            self._metrics.guard_failures.labels(self._interim.name).inc()
            logger.exception("guard.failed", extra={"request_id": request_id, "mechanism": self._interim.name,
                                                    "target_id": target_id})
            raise GuardFailed() from exc

    def may_be_plain(self, snapshot: RegistrySnapshot) -> bool:
        """Whether a prompt that hits no target gets the plain plan: no always-gated mechanism applies to every one."""
        return not self._candidates((), snapshot)

    def _candidates(self, hits: tuple[Hit, ...], snapshot: RegistrySnapshot) -> tuple[Hit, ...]:
        """The prompt's hits plus every target with an always-gated mechanism (cached per snapshot revision)."""
        if self._always[0] != snapshot.revision:
            always = tuple(Hit(target_id, 0.0, gates=frozenset({ALWAYS_GATE}))
                           for target_id, target in sorted(snapshot.targets.items())
                           if any(mechanism.name in target.mechanisms
                                  and mechanism.gate(target.mechanisms[mechanism.name].get("options", {}))
                                  == ALWAYS_GATE for mechanism in self.mechanisms))
            self._always = (snapshot.revision, always)
        hit_ids = {hit.target_id for hit in hits}
        return hits + tuple(hit for hit in self._always[1] if hit.target_id not in hit_ids)

    def engine_plan(self, prompt: RenderedPrompt, composed: ComposedPlan) -> EnginePlan:
        """Turn the mechanisms' contributions into the engine request (``prompt_embeds`` only if one edits them)."""
        extra_args = {"lethe": composed.processor_args} if composed.processor_args else None
        lora = composed.loras[0] if composed.loras else None  # O3's stack is the only adapter: one per snapshot
        mechanisms = tuple(composed.mechanisms)
        if not composed.embedding_edits:
            return EnginePlan(prompt={"prompt_token_ids": prompt.token_ids}, extra_args=extra_args, lora_request=lora,
                              mechanisms=mechanisms)
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
        return EnginePlan(prompt=engine_prompt, extra_args=extra_args, lora_request=lora, mechanisms=mechanisms)

    def _check_embeds(self, embeds: torch.Tensor, length: int) -> None:
        """A malformed tensor would kill vLLM's EngineCore (VLLM_NOTES §2): check it here, and refuse instead."""
        info = self._engine.info
        if (embeds.ndim != 2 or embeds.shape != (length, info.hidden_size) or embeds.dtype != info.dtype
                or not bool(torch.isfinite(embeds).all())):
            logger.error("guard.bad_embeds", extra={"shape": list(embeds.shape), "dtype": str(embeds.dtype)})
            raise GuardFailed()
