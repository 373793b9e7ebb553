"""ECO's zeroth-order search for σ (``zeroth_order_optim.py`` of the paper's code; METHODS.md §1).

ROUGE-L of the corrupted model's replies is a step function of σ, so the finite-difference gradient is often 0 or
wild: the search grows σ at least ``min_growth``-fold while the goal is unmet and at most ``max_growth``-fold a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


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
