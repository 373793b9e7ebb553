"""Which registered forget targets a request is about (SPEC §5).

Registration time (a job): `fit_prompt_classifier(spec, embedder)` turns a `TargetSpec` into an artifact saved as
`arrays.npz` + `meta.json`. Request time: `ClassifierBank` scores a conversation against every active target in one
matmul plus one alias-index lookup. A mechanism that brings its own gate (O3's OOD detector, `guards/o3/`) reuses the
bank's embeddings.
"""

from classifiers.aliases import AliasIndex, AliasMatcher
from classifiers.bank import ClassifierBank
from classifiers.embedding import Embedder, default_model_path
from classifiers.negatives import Negative, builtin_negative_pool
from classifiers.prompt_classifier import (
    PromptClassifierArtifact,
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
    "PromptClassifierArtifact",
    "TargetSpec",
    "builtin_negative_pool",
    "default_model_path",
    "fit_prompt_classifier",
]
