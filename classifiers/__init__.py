"""Which registered forget targets a request is about (SPEC §5).

Registration time (a job): `fit_prompt_classifier(spec, embedder)` and, for O3, `fit_ood_detector(spec, embedder)`
turn a `TargetSpec` into artifacts saved as `arrays.npz` + `meta.json`. Request time: `ClassifierBank` scores a
conversation against every active target in one matmul plus one alias-index lookup, and `OODBank` gives O3's
per-target weights from the same embeddings.
"""

from classifiers.aliases import AliasIndex, AliasMatcher
from classifiers.bank import ClassifierBank
from classifiers.embedding import Embedder, default_model_path
from classifiers.negatives import Negative, builtin_negative_pool
from classifiers.ood import OODArtifact, OODBank, fit_ood_detector
from classifiers.prompt_classifier import (
    PromptClassifier,
    PromptClassifierArtifact,
    TargetScore,
    fit_prompt_classifier,
)
from classifiers.types import AliasSpan, BankResult, Conversation, ForgetItem, Hit, TargetSpec

__all__ = [
    "AliasIndex",
    "AliasMatcher",
    "AliasSpan",
    "BankResult",
    "ClassifierBank",
    "Conversation",
    "Embedder",
    "ForgetItem",
    "Hit",
    "Negative",
    "OODArtifact",
    "OODBank",
    "PromptClassifier",
    "PromptClassifierArtifact",
    "TargetScore",
    "TargetSpec",
    "builtin_negative_pool",
    "default_model_path",
    "fit_ood_detector",
    "fit_prompt_classifier",
]
