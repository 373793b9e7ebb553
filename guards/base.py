"""The one small interface every unlearning mechanism implements, and what crosses it.

A guard has two moments (SPEC §6): ``prepare`` at registration, which names the jobs that build its artifacts (σ
calibration, phrase extraction, training), and ``plan`` per request, which says what the engine request of a prompt
that hit the guard's target must carry. ``gate`` names the detector that decides whether a prompt hit the target for
this mechanism (the prompt classifier, O3's OOD detector, or every request), and ``share`` builds, once per registry
snapshot, what the guard needs across targets (O3's rank-stacked adapter). The pipeline loops over ``GUARDS`` in their fixed order and never branches on a
mechanism's name; a guard never sees HTTP, the database or the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from classifiers.types import CLASSIFIER_GATE, AliasSpan


@dataclass(frozen=True)
class PromptView:
    """A rendered prompt as guards see it: token ids, the text they were encoded from, and the conversation turns."""

    token_ids: Sequence[int]
    text: str
    turns: tuple[tuple[str, str], ...]  # (role, content); one ("user", text) turn for /v1/completions
    from_text: bool  # False when the client sent token ids: then char offsets of `text` do not map onto tokens
    add_special_tokens: bool  # how `text` was encoded into `token_ids`


@dataclass(frozen=True)
class TargetHit:
    """One target a prompt is about, with everything a guard may read about it."""

    target_id: str
    score: float
    alias_spans: tuple[AliasSpan, ...]
    aliases: tuple[str, ...]
    options: Mapping[str, Any]  # the mechanism's options as registered (defaults filled in)
    state: Mapping[str, Any]  # what the mechanism's jobs published (artifact digests, calibrated values)


@dataclass(frozen=True)
class PlanRequest:
    """What ``Guard.plan`` receives for one prompt and one hit target."""

    hit: TargetHit
    prompt: PromptView
    query_embeddings: np.ndarray  # (n, d) the classifier's embeddings of the prompt's texts, for retrieval
    seed: int  # per-request seed: the same request gets the same corruption
    shared: Any = None  # what the guard's ``share`` built for the request's registry snapshot


class EmbeddingEdit(Protocol):
    """An in-place change of a prompt's input embeddings (ECO); ``embeds`` is (T, hidden)."""

    def apply(self, embeds: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class GuardPlan:
    """One guard's contribution to one engine request.

    ``processor_args`` travels in ``SamplingParams.extra_args["lethe"][guard name]`` (msgpack-safe values only) to
    the logits processor; ``embedding_edits`` turn the prompt into ``prompt_embeds``; ``lora`` attaches an adapter.
    """

    processor_args: Mapping[str, Any] | None = None
    embedding_edits: tuple[EmbeddingEdit, ...] = ()
    lora: Any = None


@dataclass(frozen=True)
class JobSpec:
    """A registration-time job a mechanism needs before it can serve (its kind names the handler)."""

    kind: str


class Guard(Protocol):
    """One unlearning mechanism. ``name`` is its key in a target's ``mechanisms``."""

    name: str

    def prepare(self, options: Mapping[str, Any]) -> tuple[JobSpec, ...]:
        """The jobs that must succeed before this mechanism can serve a target registered with ``options``."""
        ...

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        """Whether the published state is enough to serve (e.g. σ known)."""
        ...

    def gate(self, options: Mapping[str, Any]) -> str:
        """Which detector's hit makes this mechanism apply (``classifiers.types.*_GATE``)."""
        ...

    def share(self, entries: Sequence[TargetEntry]) -> Any:
        """Per-snapshot resources across every target that enables this mechanism (None if none needed)."""
        ...

    def plan(self, request: PlanRequest) -> GuardPlan:
        """This guard's part of the engine request for a prompt that hit its target."""
        ...


@dataclass(frozen=True)
class TargetEntry:
    """One target's registration of one mechanism, as ``Guard.share`` sees it."""

    target_id: str
    options: Mapping[str, Any]
    state: Mapping[str, Any]


class ClassifierGated:
    """The common case: applied when the prompt classifier flags the target; nothing shared across targets."""

    @staticmethod
    def gate(options: Mapping[str, Any]) -> str:
        return CLASSIFIER_GATE

    @staticmethod
    def share(entries: Sequence[TargetEntry]) -> Any:
        return None


@dataclass
class ComposedPlan:
    """Every guard's contributions to one prompt, in guard order, before they become an engine request."""

    processor_args: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    embedding_edits: list[EmbeddingEdit] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)

    def add(self, name: str, plan: GuardPlan) -> None:
        if plan.processor_args is not None:
            self.processor_args.setdefault(name, []).append(dict(plan.processor_args))
        self.embedding_edits.extend(plan.embedding_edits)
        if plan.lora is not None:
            self.loras.append(plan.lora)
        if name not in self.mechanisms:
            self.mechanisms.append(name)
