"""The O3 gate: how in-distribution a prompt is for a target's data, as a weight w in [0, 1] for the target's LoRA.

O3 (Gao et al., 2024; METHODS.md §3) scores a prompt by the Mahalanobis distance of its features to the target's
training features plus the max cosine to stored training exemplars, and maps that score to a weight calibrated on
held-out target data. Here the features are the shared sentence embeddings (no per-target RoBERTa), and:

- Mahalanobis: mean and Ledoit-Wolf-shrunk covariance of the target's forget prompts (~100 samples in 384 dims: the
  empirical covariance is singular). Shrunk covariance = s2*I + V diag(lam) V^T, kept as its top `max_rank` principal
  directions (exact while the prompts number at most max_rank + 1), so the precision is applied by Woodbury in
  O(d*r) and a bank of T targets stacks into matrices.
- Combined score: s = z(max cosine) - z(Mahalanobis distance), each standardised by its mean/std over the negative
  pool, so both are in "how far from ordinary traffic" units and neither scale dominates (O3's raw sum weights its
  cosine term by a constant tuned to RoBERTa features, which does not transfer).
- Weight: w = sigmoid(a*s + b), a 1-D class-balanced logistic map fitted on out-of-fold scores of the target's
  prompts (each fold's detector fitted without them: held-out target data) against the negative pool. This replaces
  O3's GMM-CDF construction, which needs held-out and training scores that separate, and has no negative data; we
  have a negative pool, and a logistic map makes w read as P(target-like | s) at balanced priors.
Bucketing w into LoRA scales (O3's TOFU rule) is the O3 guard's business; this module only produces w.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from classifiers.artifact_io import content_hash, load_artifact, save_artifact
from classifiers.conversation import texts_to_embed
from classifiers.embedding import Embedder
from classifiers.matmul import rows_dot
from classifiers.negatives import Negative, negatives_for
from classifiers.positives import forget_prompts
from classifiers.types import Conversation, TargetSpec

logger = logging.getLogger(__name__)

ARTIFACT_KIND = "lethe.ood_detector"
ARTIFACT_VERSION = 1
DEFAULT_MAX_RANK = 64
DEFAULT_MAX_EXEMPLARS = 256
_MIN_STD = 1e-6


@dataclass(frozen=True)
class _Gaussian:
    """Mean and low-rank-plus-isotropic precision of a shrunk covariance (see module docstring)."""

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (d, r) principal directions V
    coef: np.ndarray  # (r,) lam / (s2 + lam)
    isotropic_var: float  # s2
    shrinkage: float


def fit_gaussian(x: np.ndarray, max_rank: int = DEFAULT_MAX_RANK) -> _Gaussian:
    """Ledoit-Wolf shrunk Gaussian of rows of `x`: Sigma = (1-delta) S + delta * tr(S)/d * I, in Woodbury form."""
    n, d = x.shape
    mean = x.mean(axis=0)
    centered = (x - mean).astype(np.float64)
    delta = float(ledoit_wolf_shrinkage(centered, assume_centered=True))
    trace_per_dim = float((centered**2).sum() / (n * d))
    s2 = max(delta * trace_per_dim, _MIN_STD * max(trace_per_dim, _MIN_STD))
    _, singular, vt = np.linalg.svd(centered / np.sqrt(n), full_matrices=False)  # S = V diag(singular^2) V^T
    rank = min(max_rank, int((singular > 1e-10).sum()))
    lam = (1.0 - delta) * singular[:rank] ** 2
    basis = vt[:rank].T.astype(np.float32)  # (d, r)
    return _Gaussian(mean.astype(np.float32), basis, (lam / (s2 + lam)).astype(np.float32), s2, delta)


def mahalanobis(g: _Gaussian, x: np.ndarray) -> np.ndarray:
    """sqrt((x - mu)^T Sigma^-1 (x - mu)) per row; Sigma^-1 = (I - V diag(coef) V^T) / s2 (Woodbury)."""
    diff = x.astype(np.float64) - g.mean
    proj = diff @ g.basis  # (n, r)
    d2 = ((diff**2).sum(axis=1) - (g.coef * proj**2).sum(axis=1)) / g.isotropic_var
    return np.sqrt(np.maximum(d2, 0.0))


@dataclass(frozen=True)
class OODArtifact:
    """A fitted O3 gate for one target; `weights(embeddings)` gives w in [0, 1] per row."""

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (d, r)
    coef: np.ndarray  # (r,)
    exemplars: np.ndarray  # (m, d) unit-norm forget-prompt embeddings
    isotropic_var: float
    shrinkage: float
    cos_mean: float  # over the negative pool, for standardising
    cos_std: float
    maha_mean: float
    maha_std: float
    slope: float  # w = sigmoid(slope * s + intercept)
    intercept: float
    embedder_id: str
    n_train: int
    heldout_weight_median: float  # out-of-fold, target prompts
    negative_weight_p99: float  # negative pool
    gate_threshold: float = 0.5  # w at or above it opens the gate (see `calibrate_gate`)
    gate_heldout_recall: float | None = None  # out-of-fold target prompts at or above the threshold
    gate_false_positive_rate: float | None = None  # negative pool at or above it
    version: int = ARTIFACT_VERSION

    _ARRAYS = ("mean", "basis", "coef", "exemplars")

    def _gaussian(self) -> _Gaussian:
        return _Gaussian(self.mean, self.basis, self.coef, self.isotropic_var, self.shrinkage)

    def combined_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """s per row: standardised max cosine minus standardised Mahalanobis distance."""
        cos = (embeddings @ self.exemplars.T).max(axis=1)
        maha = mahalanobis(self._gaussian(), embeddings)
        return (cos - self.cos_mean) / self.cos_std - (maha - self.maha_mean) / self.maha_std

    def weights(self, embeddings: np.ndarray) -> np.ndarray:
        return _sigmoid(self.slope * self.combined_scores(embeddings) + self.intercept)

    def _parts(self) -> tuple[dict[str, np.ndarray], dict]:
        fields = asdict(self)
        return {k: np.asarray(fields.pop(k), dtype=np.float32) for k in self._ARRAYS}, fields

    def save(self, directory: str | Path) -> Path:
        return save_artifact(directory, ARTIFACT_KIND, *self._parts())

    @classmethod
    def load(cls, directory: str | Path) -> OODArtifact:
        arrays, meta = load_artifact(directory, ARTIFACT_KIND)
        meta.pop("kind")
        if meta.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"OOD artifact version {meta.get('version')} is not {ARTIFACT_VERSION}")
        return cls(**arrays, **meta)

    def content_hash(self) -> str:
        return content_hash(*self._parts())


def fit_ood_detector(
    spec: TargetSpec,
    embedder: Embedder,
    *,
    seed: int = 0,
    negative_pool: Sequence[Negative] | None = None,
    folds: int = 5,
    max_rank: int = DEFAULT_MAX_RANK,
    max_exemplars: int = DEFAULT_MAX_EXEMPLARS,
) -> OODArtifact:
    """Fit `spec`'s O3 gate on its forget prompts; calibrate w on out-of-fold prompts vs the negative pool."""
    positives = forget_prompts(spec, seed=seed)
    negatives = negatives_for(spec, negative_pool)
    groups = np.array([p.group for p in positives])
    n_folds = min(folds, len(set(groups.tolist())))
    if n_folds < 2:
        raise ValueError(f"target {spec.id}: need forget prompts from at least 2 sources (items or aliases)")
    x_pos = embedder.encode([p.text for p in positives])
    x_neg = embedder.encode([n.text for n in negatives])

    # Raw (cos, maha) for held-out target prompts, each from a detector fitted on the other folds.
    heldout = np.empty((len(positives), 2))
    for train, test in GroupKFold(n_splits=n_folds).split(x_pos, groups=groups):
        exemplars = _exemplars(x_pos[train], max_exemplars, seed)
        heldout[test] = _raw_components(fit_gaussian(x_pos[train], max_rank), exemplars, x_pos[test])
    gaussian = fit_gaussian(x_pos, max_rank)
    exemplars = _exemplars(x_pos, max_exemplars, seed)
    negative = _raw_components(gaussian, exemplars, x_neg)

    (cos_mean, maha_mean), (cos_std, maha_std) = negative.mean(axis=0), np.maximum(negative.std(axis=0), _MIN_STD)

    def standardise(raw: np.ndarray) -> np.ndarray:
        return (raw[:, 0] - cos_mean) / cos_std - (raw[:, 1] - maha_mean) / maha_std

    s_pos, s_neg = standardise(heldout), standardise(negative)
    logistic = LogisticRegression(class_weight="balanced").fit(
        np.r_[s_pos, s_neg][:, None], np.r_[np.ones(len(s_pos)), np.zeros(len(s_neg))]
    )
    slope, intercept = float(logistic.coef_[0, 0]), float(logistic.intercept_[0])
    w_pos, w_neg = _sigmoid(slope * s_pos + intercept), _sigmoid(slope * s_neg + intercept)
    gate = calibrate_gate(w_pos, w_neg)
    artifact = OODArtifact(
        mean=gaussian.mean, basis=gaussian.basis, coef=gaussian.coef, exemplars=exemplars,
        isotropic_var=float(gaussian.isotropic_var), shrinkage=gaussian.shrinkage,
        cos_mean=float(cos_mean), cos_std=float(cos_std), maha_mean=float(maha_mean), maha_std=float(maha_std),
        slope=slope, intercept=intercept, embedder_id=embedder.model_id, n_train=len(positives),
        heldout_weight_median=float(np.median(w_pos)), negative_weight_p99=float(np.quantile(w_neg, 0.99)),
        gate_threshold=gate, gate_heldout_recall=float((w_pos >= gate).mean()),
        gate_false_positive_rate=float((w_neg >= gate).mean()),
    )
    logger.info(
        "target %s: OOD gate on %d prompts (shrinkage %.2f, rank %d): held-out median w %.3f, negative p99 w %.3f, "
        "gate w >= %.3f (held-out recall %.3f, negative FPR %.4f)",
        spec.id, len(positives), gaussian.shrinkage, gaussian.basis.shape[1], artifact.heldout_weight_median,
        artifact.negative_weight_p99, gate, artifact.gate_heldout_recall, artifact.gate_false_positive_rate,
    )
    return artifact


def calibrate_gate(heldout: np.ndarray, negatives: np.ndarray) -> float:
    """The weight threshold that best separates held-out target prompts from the negative pool (Youden's J).

    O3 buckets w with fixed cut points tuned to its RoBERTa detector; ours are recalibrated per target, so the cut is
    too: the threshold maximising recall on out-of-fold target prompts minus the negative pool's false-positive rate.
    Ties go to the lower threshold: a missed target prompt leaks, a false open only costs one reply the adapter.
    """
    candidates = np.unique(np.r_[heldout, negatives])
    recall = (heldout[None, :] >= candidates[:, None]).mean(axis=1)
    false_positive = (negatives[None, :] >= candidates[:, None]).mean(axis=1)
    return float(candidates[int(np.argmax(recall - false_positive))])


def _exemplars(x: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(x) <= limit:
        return x.astype(np.float32)
    rows = np.random.default_rng(seed).choice(len(x), size=limit, replace=False)
    return x[np.sort(rows)].astype(np.float32)


def _raw_components(g: _Gaussian, exemplars: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(n, 2): max cosine to exemplars, Mahalanobis distance."""
    return np.c_[(x @ exemplars.T).max(axis=1), mahalanobis(g, x)]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class OODBank:
    """Every O3 target's gate, scored for one request with a few matmuls (no Python loop over targets)."""

    def __init__(self, artifacts: Mapping[str, OODArtifact], embedder: Embedder):
        for tid, artifact in artifacts.items():
            if artifact.embedder_id != embedder.model_id:
                raise ValueError(f"target {tid}: fitted with {artifact.embedder_id}, embedder is {embedder.model_id}")
        self.target_ids = list(artifacts)
        self.thresholds = {tid: artifacts[tid].gate_threshold for tid in self.target_ids}
        self._embedder = embedder
        arts = [artifacts[t] for t in self.target_ids]
        d, t_count = embedder.dim, len(arts)
        rank = max((a.basis.shape[1] for a in arts), default=0)
        self._means = np.stack([a.mean for a in arts]) if arts else np.zeros((0, d), np.float32)  # (T, d)
        self._mean_sq = (self._means.astype(np.float64) ** 2).sum(axis=1)  # (T,)
        basis = np.zeros((t_count, d, rank), np.float32)
        self._coef = np.zeros((t_count, rank), np.float64)
        for i, a in enumerate(arts):
            basis[i, :, : a.basis.shape[1]] = a.basis
            self._coef[i, : a.coef.shape[0]] = a.coef
        self._rank = rank
        self._basis_rows = np.ascontiguousarray(basis.transpose(0, 2, 1).reshape(t_count * rank, d))  # (T*r, d)
        self._mean_proj = np.einsum("td,tdr->tr", self._means, basis).astype(np.float64)  # (T, r)
        self._var = np.array([a.isotropic_var for a in arts])
        self._exemplars = np.concatenate([a.exemplars for a in arts]) if arts else np.zeros((0, d), np.float32)
        self._offsets = np.cumsum([0] + [len(a.exemplars) for a in arts[:-1]]).astype(np.intp)
        self._cos_mean, self._cos_std, self._maha_mean, self._maha_std, self._slope, self._intercept = (
            np.array([getattr(a, name) for a in arts])
            for name in ("cos_mean", "cos_std", "maha_mean", "maha_std", "slope", "intercept")
        )

    def __len__(self) -> int:
        return len(self.target_ids)

    def score(self, conversation: Conversation) -> dict[str, float]:
        """{target_id: w} for a conversation (max over its embedded texts, as for the prompt classifier)."""
        if not self.target_ids:
            return {}
        texts = texts_to_embed(conversation)
        return self.score_embeddings(self._embedder.encode(texts)) if texts else dict.fromkeys(self.target_ids, 0.0)

    def score_embeddings(self, embeddings: np.ndarray) -> dict[str, float]:
        """{target_id: w} from already-embedded texts (e.g. `BankResult.embeddings`), max over rows."""
        if not self.target_ids or len(embeddings) == 0:
            return dict.fromkeys(self.target_ids, 0.0)
        e = embeddings.astype(np.float32)
        n, t_count = len(e), len(self.target_ids)
        cos = np.maximum.reduceat(rows_dot(self._exemplars, e), self._offsets, axis=1)  # (n, T)
        sq = (e.astype(np.float64) ** 2).sum(axis=1)[:, None] - 2.0 * rows_dot(self._means, e) + self._mean_sq  # (n, T)
        proj = rows_dot(self._basis_rows, e).reshape(n, t_count, self._rank) - self._mean_proj  # (n, T, r)
        d2 = (sq - (self._coef * proj.astype(np.float64) ** 2).sum(axis=2)) / self._var
        maha = np.sqrt(np.maximum(d2, 0.0))
        s = (cos - self._cos_mean) / self._cos_std - (maha - self._maha_mean) / self._maha_std
        w = _sigmoid(self._slope * s + self._intercept).max(axis=0)
        return dict(zip(self.target_ids, w.tolist()))

    def open_gates(self, embeddings: np.ndarray) -> dict[str, float]:
        """{target_id: w} for the targets whose gate this request opens (w at or above its calibrated threshold)."""
        return {tid: w for tid, w in self.score_embeddings(embeddings).items() if w >= self.thresholds[tid]}
