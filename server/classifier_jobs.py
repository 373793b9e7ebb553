"""Glue between the registry and ``classifiers/``: the fit job and the bank factory of the live snapshot.

A target's classifier artifact directory holds ``prompt/`` (the prompt classifier that gates ECO, GUARD and ULD) and,
when the target enables O3, ``ood/`` (the O3 gate). It is content-addressed, so replicas load it by digest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from classifiers.bank import ClassifierBank
from classifiers.embedding import Embedder
from classifiers.ood import OODArtifact, OODBank, fit_ood_detector
from classifiers.prompt_classifier import (DEFAULT_MAX_FALSE_POSITIVE_RATE, PromptClassifierArtifact,
                                          fit_prompt_classifier)
from classifiers.types import ForgetItem, TargetSpec
from server.jobs import JobContext, JobHandler
from server.registry.records import TargetRecord

logger = logging.getLogger(__name__)

PROMPT_DIR = "prompt"
OOD_DIR = "ood"


def target_spec(record: TargetRecord) -> TargetSpec:
    def items(rows: list[dict[str, Any]]) -> list[ForgetItem]:
        return [ForgetItem(question=r.get("question"), answer=r.get("answer"), text=r.get("text")) for r in rows]

    return TargetSpec(id=record.id, name=record.name, aliases=list(record.aliases), forget=items(record.forget),
                      retain=items(record.retain))


def fit_classifier_handler(embedder: Callable[[], Embedder], recall: float,
                           max_false_positive_rate: float = DEFAULT_MAX_FALSE_POSITIVE_RATE) -> JobHandler:
    """The ``fit_classifier`` job: fit the prompt classifier (and the O3 gate if enabled), store them, report figures."""

    def run(context: JobContext) -> dict[str, Any]:
        spec = target_spec(context.target)
        model = embedder()
        staging = context.artifacts.staging_dir()
        wants_ood = "o3" in context.target.mechanisms
        share = 0.8 if wants_ood else 1.0
        prompt = fit_prompt_classifier(spec, model, recall=recall, max_false_positive_rate=max_false_positive_rate,
                                       progress=lambda f, m: context.progress(f * share, m))
        prompt.save(staging / PROMPT_DIR)
        gate: dict[str, Any] = {}
        if wants_ood:
            context.progress(0.85, "fitting the O3 gate")
            ood = fit_ood_detector(spec, model)
            ood.save(staging / OOD_DIR)
            gate = {"ood_gate": {"threshold": round(ood.gate_threshold, 4), "heldout_recall": ood.gate_heldout_recall,
                                 "false_positive_rate": ood.gate_false_positive_rate}}
        digest = context.artifacts.commit(staging)
        return {"status": "ready", "artifact": digest, "threshold": prompt.threshold,
                "false_positive_rate": prompt.false_positive_rate, "heldout_recall": prompt.heldout_recall,
                "false_positive_rate_by_source": prompt.false_positive_rate_by_source, **gate}

    return run


@lru_cache(maxsize=4096)
def _load_prompt_artifact(directory: Path) -> PromptClassifierArtifact:
    return PromptClassifierArtifact.load(directory / PROMPT_DIR)


def bank_factory(embedder: Callable[[], Embedder]) -> Callable[[dict[str, Path]], ClassifierBank]:
    """Stack the targets' prompt classifiers; artifacts are immutable, so loads are cached by path (= digest)."""

    def build(artifact_dirs: dict[str, Path]) -> ClassifierBank:
        artifacts = {target_id: _load_prompt_artifact(path) for target_id, path in artifact_dirs.items()}
        return ClassifierBank.from_artifacts(artifacts, embedder())

    return build


@lru_cache(maxsize=4096)
def _load_ood_artifact(directory: Path) -> OODArtifact:
    return OODArtifact.load(directory / OOD_DIR)


def ood_bank_factory(embedder: Callable[[], Embedder]) -> Callable[[dict[str, Path]], OODBank]:
    """Stack the O3 gates of the targets that enable O3 (their classifier artifacts hold ``ood/``)."""

    def build(artifact_dirs: dict[str, Path]) -> OODBank:
        present = {tid: path for tid, path in artifact_dirs.items() if (path / OOD_DIR).is_dir()}
        return OODBank({tid: _load_ood_artifact(path) for tid, path in present.items()}, embedder())

    return build
