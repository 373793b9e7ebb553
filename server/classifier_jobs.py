"""Glue between the registry and ``classifiers/``: the fit job and the detector banks of the live snapshot.

A target's classifier artifact directory holds ``prompt/`` (the prompt classifier that gates ECO, GUARD and ULD) and,
for each enabled mechanism that brings its own gate (``Mechanism.gate_detector``: O3's OOD detector), a subdirectory
named after that gate. It is content-addressed, so replicas load it by digest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.bank import Calibration, ClassifierBank, calibration_windows
from classifiers.conversation import DEFAULT_MAX_TEXTS
from classifiers.embedding import Embedder
from classifiers.negatives import calibration_negatives
from classifiers.prompt_classifier import (DEFAULT_MAX_FALSE_POSITIVE_RATE, PromptClassifierArtifact,
                                          fit_prompt_classifier)
from guards.base import GateDetector, Mechanism
from guards.job_interface import JobContext, JobHandler, target_spec

logger = logging.getLogger(__name__)

PROMPT_DIR = "prompt"


def gate_detectors(mechanisms: Sequence[Mechanism], enabled: Mapping[str, Any] | None = None) -> list[GateDetector]:
    """The distinct gate detectors of the mechanisms (only those ``enabled`` names, when given), in mechanism order."""
    detectors: dict[str, GateDetector] = {}
    for mechanism in mechanisms:
        detector = mechanism.gate_detector
        if detector is not None and (enabled is None or mechanism.name in enabled):
            detectors.setdefault(detector.name, detector)
    return list(detectors.values())


def fit_classifier_handler(embedder: Callable[[], Embedder], recall: float, mechanisms: Sequence[Mechanism],
                           max_false_positive_rate: float = DEFAULT_MAX_FALSE_POSITIVE_RATE) -> JobHandler:
    """The ``fit_classifier`` job: fit the prompt classifier (and the enabled mechanisms' own gates), store them, report
    figures."""

    def run(context: JobContext) -> dict[str, Any]:
        spec = target_spec(context.target)
        model = embedder()
        staging = context.artifacts.staging_dir()
        detectors = gate_detectors(mechanisms, context.target.mechanisms)
        share = 0.8 if detectors else 1.0
        prompt = fit_prompt_classifier(spec, model, recall=recall, max_false_positive_rate=max_false_positive_rate,
                                       progress=lambda f, m: context.progress(f * share, m))
        prompt.save(staging / PROMPT_DIR)
        gates: dict[str, Any] = {}
        for detector in detectors:
            context.progress(0.85, f"fitting the {detector.name} gate")
            gates[f"{detector.name}_gate"] = detector.fit(spec, model, staging / detector.name)
        digest = context.artifacts.commit(staging)
        return {"status": "ready", "artifact": digest, "threshold": prompt.threshold,
                "false_positive_rate": prompt.false_positive_rate, "heldout_recall": prompt.heldout_recall,
                "false_positive_rate_by_source": prompt.false_positive_rate_by_source, **gates}

    return run


@lru_cache(maxsize=4096)
def _load_prompt_artifact(directory: Path) -> PromptClassifierArtifact:
    return PromptClassifierArtifact.load(directory / PROMPT_DIR)


def check_classifier_artifact(directory: Path) -> None:
    """Raise if the prompt classifier of this classifier artifact cannot be read; a readable one is then cached for
    the bank (``registry/readable.py``: an unreadable one degrades its own target, not the snapshot)."""
    _load_prompt_artifact(directory)


class CalibrationVectors:
    """The calibration negatives' embeddings, kept for the replica's life: a snapshot rebuild (every registry revision)
    then recalibrates in a fraction of a second instead of re-embedding some 350 texts (6.6 s on 2 cores), which once
    held a registration 6.5 s past the 2 s propagation budget. ``warm`` embeds the built-in share ahead of the first
    target."""

    def __init__(self, embedder: Callable[[], Embedder]) -> None:
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        if missing:
            vectors = self._embedder().encode(missing)
            with self._lock:
                self._vectors.update(zip(missing, vectors))
        with self._lock:
            return np.stack([self._vectors[text] for text in texts]) if texts else np.zeros((0, 0), np.float32)

    def warm(self) -> None:
        self.encode([window for windows in calibration_windows(builtin_calibration_texts()) for window in windows])


def builtin_calibration_texts() -> list[str]:
    return [negative.text for negative in calibration_negatives()]


def bank_factory(embedder: Callable[[], Embedder], max_union_false_positive_rate: float,
                 max_texts: int = DEFAULT_MAX_TEXTS,
                 on_calibrated: Callable[[Calibration], None] = lambda calibration: None,
                 vectors: CalibrationVectors | None = None,
                 ) -> Callable[[dict[str, Path], dict[str, list[str]], list[str]], ClassifierBank]:
    """Stack the targets' prompt classifiers (reading at most `max_texts` windows a request) with every target's current
    aliases (the targets not fitted yet are alias-only), and calibrate the heads together on the built-in pool's
    calibration share plus the operators' negatives; artifacts are immutable, so loads are cached by path (= digest)."""

    def build(artifact_dirs: dict[str, Path], aliases: dict[str, list[str]],
              operator_negatives: list[str]) -> ClassifierBank:
        artifacts = {target_id: _load_prompt_artifact(path) for target_id, path in artifact_dirs.items()}
        bank = ClassifierBank.from_artifacts(artifacts, embedder(), max_texts, aliases)
        negatives = builtin_calibration_texts() + list(operator_negatives)
        bank, calibration = bank.calibrated(negatives, max_union_false_positive_rate,
                                            vectors.encode if vectors is not None else None)
        logger.info("gate.calibrated", extra={"targets": len(bank), "negatives": calibration.negatives,
                                              "offsets": asdict(calibration.offsets),
                                              "union_false_positive_rate": calibration.union_false_positive_rate,
                                              "seconds": round(calibration.seconds, 3)})
        on_calibrated(calibration)
        return bank

    return build


GateBankFactory = Callable[[Mapping[str, Mapping[str, Any]], Mapping[str, Path]], dict[str, Any]]
"""({target_id: its mechanisms}, {target_id: classifier artifact dir}) -> {gate name: bank with ``open_gates``}."""


def gate_bank_factory(embedder: Callable[[], Embedder], mechanisms: Sequence[Mechanism]) -> GateBankFactory:
    """Stack, per mechanism-owned gate, the detectors of the targets that enable a mechanism gated by it."""

    def build(enabled: Mapping[str, Mapping[str, Any]], artifact_dirs: Mapping[str, Path]) -> dict[str, Any]:
        banks: dict[str, Any] = {}
        for detector in gate_detectors(mechanisms):
            owners = {m.name for m in mechanisms if m.gate_detector is not None
                      and m.gate_detector.name == detector.name}
            present = {tid: path / detector.name for tid, path in artifact_dirs.items()
                       if owners & set(enabled.get(tid, {})) and (path / detector.name).is_dir()}
            if present:
                banks[detector.name] = detector.bank(present, embedder())
        return banks

    return build
