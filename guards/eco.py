"""ECO — Embedding-COrrupted prompts (Liu et al., NeurIPS 2024).

A prompt flagged as being about a target reaches the model with the embeddings of the target's entity tokens
corrupted, so the model cannot retrieve what it knows about the entity; unflagged prompts are never touched. The
corrupted tensor goes to vLLM as ``prompt_embeds`` together with the token ids (and ``prompt_is_token_ids`` all False),
so the logits processor still sees the ids (VLLM_NOTES §2).

Which tokens (``scope``): ``entities`` — the target's alias mentions (from the classifier, mapped onto token offsets),
or, when the prompt names no alias (a paraphrase, "this author"), every user-content token but the last; ``prompt`` —
every user-content token but the last, as ECO does for WMDP. The calibration job tries ``entities`` first and moves
to ``prompt`` only if entity corruption cannot reach its goal at any σ it tries (a model that memorised the rest of
the question still answers it). Corruptions are the
paper's ``rand_noise_first_n`` (default), ``zero_out_top_k`` and ``flip_sign_top_k``; the noise is seeded per request,
so the same request gets the same reply. σ, when not given, is found by ECO's zeroth-order search
(``zeroth_order_sigma_search``) run by the ``eco_calibrate`` job against the served model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from guards.base import ClassifierGated, GuardPlan, JobSpec, PlanRequest, PromptView
from guards.token_spans import alias_token_positions, token_offsets, user_content_positions

logger = logging.getLogger(__name__)

ECO_CALIBRATE = "eco_calibrate"
RAND_NOISE_FIRST_N = "rand_noise_first_n"
ZERO_OUT_TOP_K = "zero_out_top_k"
FLIP_SIGN_TOP_K = "flip_sign_top_k"


# ---- the paper's corruption functions: each edits rows (k, d) of the prompt's embeddings in place ---------------


def rand_noise_first_n(rows: torch.Tensor, sigma: float, n: int, generator: torch.Generator) -> None:
    """e_i[0:n] += ε, ε ~ N(0, σ²)."""
    noise = torch.randn((rows.shape[0], n), generator=generator, dtype=torch.float32) * sigma
    rows[:, :n] += noise.to(rows.dtype)


def zero_out_top_k(rows: torch.Tensor, k: int) -> None:
    """The k largest-|e_i| dimensions of each row set to 0."""
    top = rows.abs().topk(k, dim=-1).indices
    rows.scatter_(-1, top, 0.0)


def flip_sign_top_k(rows: torch.Tensor, k: int) -> None:
    """The k largest-|e_i| dimensions of each row negated."""
    top = rows.abs().topk(k, dim=-1).indices
    rows.scatter_(-1, top, -rows.gather(-1, top))


def default_dims(corruption: str, hidden_size: int) -> int:
    """Dims corrupted when the target does not say: all of them, except zero-out, where ECO zeroes ~16-25 %."""
    return hidden_size // 4 if corruption == ZERO_OUT_TOP_K else hidden_size


@dataclass(frozen=True)
class EcoEdit:
    """One target's corruption of one prompt: which token positions, how, and the request's seed."""

    positions: tuple[int, ...]
    corruption: str
    sigma: float | None
    dims: int | None
    seed: int

    def apply(self, embeds: torch.Tensor) -> None:
        if not self.positions:
            return
        index = torch.as_tensor(self.positions, dtype=torch.long)
        rows = embeds[index]  # (k, d), a copy
        dims = min(self.dims or default_dims(self.corruption, embeds.shape[1]), embeds.shape[1])
        if self.corruption == RAND_NOISE_FIRST_N:
            if self.sigma is None:
                raise ValueError("rand_noise_first_n needs sigma")
            rand_noise_first_n(rows, self.sigma, dims, torch.Generator().manual_seed(self.seed))
        elif self.corruption == ZERO_OUT_TOP_K:
            zero_out_top_k(rows, dims)
        elif self.corruption == FLIP_SIGN_TOP_K:
            flip_sign_top_k(rows, dims)
        else:
            raise ValueError(f"unknown ECO corruption {self.corruption!r}")
        embeds[index] = rows


ENTITIES = "entities"
PROMPT = "prompt"


def corrupted_positions(
    tokenizer: Any, prompt: PromptView, alias_spans: Any, special_ids: frozenset[int], scope: str = ENTITIES
) -> tuple[int, ...]:
    """``entities``: the target's entity tokens if the prompt names it, else (and for ``prompt``) every user-content
    token but the last."""
    offsets = token_offsets(tokenizer, prompt)
    if scope == ENTITIES and offsets is not None and alias_spans:
        positions = alias_token_positions(prompt, offsets, alias_spans)
        if positions:
            return tuple(positions)
    positions = user_content_positions(prompt, offsets, special_ids)
    return tuple(positions[:-1]) if len(positions) > 1 else tuple(positions)


class EcoGuard(ClassifierGated):
    """The ECO mechanism: ``prompt_embeds`` with the target's entity tokens corrupted."""

    name = "eco"

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))

    @staticmethod
    def prepare(options: Mapping[str, Any]) -> tuple[JobSpec, ...]:
        needs_sigma = options.get("corruption", RAND_NOISE_FIRST_N) == RAND_NOISE_FIRST_N
        return (JobSpec(ECO_CALIBRATE),) if needs_sigma and options.get("sigma") is None else ()

    @staticmethod
    def ready(options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        return sigma_of(options, state) is not None or not EcoGuard.prepare(options)

    def plan(self, request: PlanRequest) -> GuardPlan:
        options, state = request.hit.options, request.hit.state
        edit = EcoEdit(
            positions=corrupted_positions(self._tokenizer, request.prompt, request.hit.alias_spans, self._special_ids,
                                          scope_of(options, state)),
            corruption=options.get("corruption", RAND_NOISE_FIRST_N),
            sigma=sigma_of(options, state),
            dims=options.get("dims"),
            seed=request.seed,
        )
        return GuardPlan(embedding_edits=(edit,))


def scope_of(options: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """The corruption scope as registered, else as calibrated (``entities`` when nothing decided)."""
    scope = options.get("scope", "auto")
    return scope if scope != "auto" else state.get("scope", ENTITIES)


def sigma_of(options: Mapping[str, Any], state: Mapping[str, Any]) -> float | None:
    """σ as registered, else as calibrated."""
    sigma = options.get("sigma")
    return float(sigma) if sigma is not None else state.get("sigma")


# ---- σ calibration: ECO's zeroth-order search ---------------------------------------------------------------------


@dataclass(frozen=True)
class SigmaSearchConfig:
    """ECO's ``zeroth_order_optim.py`` defaults (σ0 = 0.1, ε = 0.999·σ, η = 100, σ_min = 0.1); every evaluation
    generates replies with the served model, so steps are few."""

    sigma0: float = 0.1
    epsilon_fraction: float = 0.999
    eta: float = 100.0
    sigma_min: float = 0.1
    max_steps: int = 6
    min_growth: float = 4.0  # while the goal is unmet, σ grows at least this much per step
    max_growth: float = 1e3  # one step moves σ by at most this factor (the FD gradient of a step function is wild)


@dataclass(frozen=True)
class SigmaSearchResult:
    sigma: float
    reached_goal: bool
    curve: list[tuple[float, float]]  # every (σ, objective) evaluated, in order


def zeroth_order_sigma_search(
    objective: Callable[[float], float],
    goal: float,
    config: SigmaSearchConfig = SigmaSearchConfig(),
    on_step: Callable[[int, float, float], None] | None = None,
) -> SigmaSearchResult:
    """Drive ``objective(σ)`` (forget-set ROUGE-L of the corrupted model) down to ``goal``; return the smallest σ
    evaluated that reaches it, else the σ with the lowest objective.

    Search, as ECO: g = (f(σ+ε) − f(max(σ−ε, 1e-8))) / 2ε;  σ ← max(σ − η·g, σ_min), stopping at the goal. ROUGE-L
    is a step function of σ, so g is often 0 or tiny; while the goal is unmet σ grows at least `min_growth`-fold.
    (A refinement down to the borderline σ was tried and dropped: the mean over a sample then sits at the goal and
    too many single questions stay above it.)
    """
    seen: dict[float, float] = {}
    curve: list[tuple[float, float]] = []

    def f(sigma: float) -> float:
        key = round(sigma, 12)
        if key not in seen:
            seen[key] = objective(sigma)
            curve.append((sigma, seen[key]))
        return seen[key]

    sigma = config.sigma0
    for step in range(config.max_steps):
        value = f(sigma)
        if on_step is not None:
            on_step(step, sigma, value)
        if value <= goal:
            break
        epsilon = config.epsilon_fraction * sigma
        upper = f(sigma + epsilon)
        if upper <= goal:
            break
        gradient = (upper - f(max(sigma - epsilon, 1e-8))) / (2 * epsilon)
        proposed = max(sigma - config.eta * gradient, config.min_growth * sigma)
        sigma = max(min(proposed, sigma * config.max_growth), config.sigma_min)
        if not math.isfinite(sigma):
            break
    reached = [s for s, v in curve if v <= goal]
    if not reached:
        best = min(curve, key=lambda point: (point[1], point[0]))
        return SigmaSearchResult(best[0], False, curve)
    return SigmaSearchResult(min(reached), True, curve)
