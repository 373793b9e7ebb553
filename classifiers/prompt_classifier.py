"""The per-target prompt classifier (gate of ECO, GUARD and ULD): a logistic-regression head on sentence embeddings
plus the target's alias matcher.

Fitting: positives are the target's forget prompts (`positives.py`), negatives its retain prompts plus the built-in
pool (`negatives.py`). The head is class-balanced logistic regression (the data are ~100 positives against ~1,300
negatives, linearly separable enough in MiniLM space that a linear head generalises better than anything with more
capacity). Its threshold is calibrated on out-of-fold scores (grouped, stratified k-fold, so a question and its
re-namings are never split across folds) for the configured recall, but never below the threshold that keeps the
out-of-fold false-positive rate under a cap: one forget prompt unlike all the others (a question that never names the
target) would otherwise drag the threshold down until a quarter of all traffic is flagged (measured on TOFU forget05:
three of ten authors at 19-28 %). The achieved held-out recall and false-positive rate are stored on the artifact.
At request time an alias mention is a hit whatever the head says; a head alone is weighed by entity evidence and
registry-wide offsets (``bank.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from classifiers.aliases import AliasMatcher
from classifiers.artifact_io import content_hash, load_artifact, save_artifact
from classifiers.calibration import rate_at_or_above, threshold_for_false_positive_rate, threshold_for_recall
from classifiers.embedding import Embedder
from classifiers.entities import vocabulary
from classifiers.negatives import Negative, negatives_for
from classifiers.positives import forget_prompts
from classifiers.types import TargetSpec

logger = logging.getLogger(__name__)

ARTIFACT_KIND = "lethe.prompt_classifier"
ARTIFACT_VERSION = 2
# Inverse L2 strength: unit-norm 384-d embeddings need weak regularisation to separate one author from many others.
DEFAULT_C = 16.0
DEFAULT_FOLDS = 5
DEFAULT_MAX_FALSE_POSITIVE_RATE = 0.02

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class PromptClassifierArtifact:
    """A fitted head: p(about target | prompt) = sigmoid(weights . embedding + bias); a hit when p >= threshold."""

    weights: np.ndarray  # (d,) float32
    bias: float
    threshold: float
    false_positive_rate: float  # out-of-fold, on all negatives, at `threshold`
    heldout_recall: float  # out-of-fold, head or alias, on all positives, at `threshold`
    n_pos: int
    n_neg: int
    aliases: list[str]
    embedder_id: str
    recall_target: float = 0.99
    false_positive_rate_by_source: dict[str, float] = field(default_factory=dict)
    max_false_positive_rate: float | None = None  # the cap the threshold was held to (None: fitted before caps)
    entities: list[str] = field(default_factory=list)  # the named things and years of its data (``entities.py``)
    version: int = ARTIFACT_VERSION

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Head probabilities for rows of `embeddings` (n, d) -> (n,)."""
        return _sigmoid(embeddings @ self.weights + self.bias)

    def _parts(self) -> tuple[dict[str, np.ndarray], dict]:
        meta = {k: v for k, v in asdict(self).items() if k != "weights"}
        return {"weights": np.asarray(self.weights, dtype=np.float32)}, meta

    def save(self, directory: str | Path) -> Path:
        arrays, meta = self._parts()
        return save_artifact(directory, ARTIFACT_KIND, arrays, meta)

    @classmethod
    def load(cls, directory: str | Path) -> PromptClassifierArtifact:
        arrays, meta = load_artifact(directory, ARTIFACT_KIND)
        meta.pop("kind")
        if meta.get("version") == 1:  # fitted before entity evidence: its head fires only with a name it can link
            logger.warning("prompt classifier artifact %s predates entity evidence; refit the target", directory)
            meta["version"] = ARTIFACT_VERSION
        if meta.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"prompt classifier artifact version {meta.get('version')} is not {ARTIFACT_VERSION}")
        return cls(weights=arrays["weights"], **meta)

    def content_hash(self) -> str:
        return content_hash(*self._parts())


def fit_prompt_classifier(
    spec: TargetSpec,
    embedder: Embedder,
    *,
    recall: float = 0.99,
    max_false_positive_rate: float = DEFAULT_MAX_FALSE_POSITIVE_RATE,
    seed: int = 0,
    progress: Progress | None = None,
    negative_pool: Sequence[Negative] | None = None,
    folds: int = DEFAULT_FOLDS,
    c: float = DEFAULT_C,
) -> PromptClassifierArtifact:
    """Fit `spec`'s head, calibrate its threshold for `recall` within `max_false_positive_rate` (deterministic)."""
    report = progress or (lambda fraction, message: None)
    report(0.0, "building prompts")
    positives = forget_prompts(spec, seed=seed)
    negatives = negatives_for(spec, negative_pool)
    pos_groups = np.array([p.group for p in positives])
    n_folds = min(folds, len(set(pos_groups.tolist())))
    if n_folds < 2:
        raise ValueError(f"target {spec.id}: need forget prompts from at least 2 sources (items or aliases)")
    if not negatives:
        raise ValueError(f"target {spec.id}: no negatives")

    report(0.05, f"embedding {len(positives)} positive and {len(negatives)} negative prompts")
    x = embedder.encode([p.text for p in positives] + [n.text for n in negatives])
    y = np.r_[np.ones(len(positives), dtype=int), np.zeros(len(negatives), dtype=int)]
    groups = np.r_[pos_groups, pos_groups.max() + 1 + np.arange(len(negatives))]

    report(0.6, f"cross-validating ({n_folds} folds)")
    oof = np.empty(len(y))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (train, test) in enumerate(splitter.split(x, y, groups)):
        oof[test] = _fit_head(x[train], y[train], c).predict_proba(x[test])[:, 1]
        report(0.6 + 0.3 * (fold + 1) / n_folds, f"fold {fold + 1}/{n_folds}")
    head = _fit_head(x, y, c)

    pos_oof, neg_oof = oof[y == 1], oof[y == 0]
    threshold = max(threshold_for_recall(pos_oof, recall),
                    threshold_for_false_positive_rate(neg_oof, max_false_positive_rate))
    matcher = AliasMatcher(spec.aliases)
    alias_hit = np.array([matcher.matches(p.text) > 0 for p in positives])
    sources = sorted({n.source for n in negatives})
    neg_sources = np.array([n.source for n in negatives])
    artifact = PromptClassifierArtifact(
        weights=head.coef_[0].astype(np.float32),
        bias=float(head.intercept_[0]),
        threshold=threshold,
        false_positive_rate=rate_at_or_above(neg_oof, threshold),
        heldout_recall=float(np.mean((pos_oof >= threshold) | alias_hit)),
        n_pos=len(positives),
        n_neg=len(negatives),
        aliases=list(spec.aliases),
        embedder_id=embedder.model_id,
        recall_target=recall,
        false_positive_rate_by_source={s: rate_at_or_above(neg_oof[neg_sources == s], threshold) for s in sources},
        max_false_positive_rate=max_false_positive_rate,
        entities=sorted(target_vocabulary(spec)),
    )
    logger.info(
        "target %s: classifier fitted on %d+/%d-, threshold %.4f, held-out recall %.3f, FPR %.4f",
        spec.id, artifact.n_pos, artifact.n_neg, threshold, artifact.heldout_recall, artifact.false_positive_rate,
    )
    if artifact.heldout_recall < recall:
        # The false-positive cap bound: some forget prompts look like ordinary traffic to the head. Alias mentions
        # still hit; more forget items (answers, texts) or a higher cap bring the head's recall up.
        logger.warning(
            "target %s: classifier held-out recall %.3f is below %.2f at the false-positive cap %.3f; add forget data",
            spec.id, artifact.heldout_recall, recall, max_false_positive_rate,
        )
    report(1.0, "done")
    return artifact


def target_vocabulary(spec: TargetSpec) -> set[str]:
    """The entity keys of a target's registration: its aliases and every text of its forget items."""
    texts = [*spec.aliases, *(text for item in spec.forget for text in (item.question, item.answer, item.text) if text)]
    return vocabulary(texts)


def _fit_head(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def mentioned_score(head_probability: float, alias_score: float, threshold: float) -> float:
    """The score of a target whose alias was mentioned (a hit whatever its head says): no less than its threshold."""
    return max(head_probability, alias_score, threshold)
