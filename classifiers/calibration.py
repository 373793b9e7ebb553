"""Turning held-out scores into an operating point: the threshold that keeps a recall, and what it costs in false
positives. Shared by the prompt classifier (threshold) and its reports."""

from __future__ import annotations

import math

import numpy as np


def threshold_for_recall(positive_scores: np.ndarray, recall: float) -> float:
    """Threshold that a new positive, exchangeable with these held-out ones, clears with probability >= `recall`.

    The split-conformal order statistic: with n held-out scores, the k-th smallest, k = floor((n + 1)(1 - recall)),
    is exceeded by a new score with probability >= 1 - k / (n + 1) >= recall. When n + 1 < 1 / (1 - recall)
    (n < 99 at recall 0.99) no order statistic guarantees the recall and the lowest score is used: every held-out
    positive is kept, and the achieved recall is bounded by n / (n + 1) instead.
    """
    if not 0 < recall < 1:
        raise ValueError(f"recall must be in (0, 1), got {recall}")
    scores = np.sort(np.asarray(positive_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no positive scores to calibrate on")
    k = math.floor((scores.size + 1) * (1 - recall) + 1e-9)
    return float(scores[max(k, 1) - 1])


def threshold_for_false_positive_rate(negative_scores: np.ndarray, max_rate: float) -> float:
    """Lowest threshold at which at most `max_rate` of these held-out negatives score at or above it."""
    if not 0 <= max_rate <= 1:
        raise ValueError(f"max_rate must be in [0, 1], got {max_rate}")
    scores = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    allowed = math.floor(max_rate * scores.size + 1e-9)  # negatives that may clear the threshold
    if allowed >= scores.size:
        return -math.inf
    return float(np.nextafter(scores[allowed], math.inf))  # strictly above the first negative that must not clear


def rate_at_or_above(scores: np.ndarray, threshold: float) -> float:
    """Fraction of `scores` >= `threshold` (a recall for positives, a false-positive rate for negatives)."""
    scores = np.asarray(scores)
    return float(np.mean(scores >= threshold)) if scores.size else 0.0
