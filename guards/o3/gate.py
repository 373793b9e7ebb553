"""O3's gate as the classifier job sees it: fitted beside the prompt classifier, stacked per snapshot.

The detector itself is ``ood.py``; this adapter saves it into the ``ood/`` subdirectory of the target's classifier
artifact (content-addressed, so replicas load it by digest) and stacks a snapshot's detectors into one ``OODBank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from classifiers.types import OOD_GATE, TargetSpec
from guards.o3.ood import OODArtifact, OODBank, fit_ood_detector


@lru_cache(maxsize=4096)
def _load(directory: Path) -> OODArtifact:
    return OODArtifact.load(directory)


class OodGate:
    """O3's ``GateDetector``: Mahalanobis + max-cosine OOD score, calibrated into a binary gate."""

    name = OOD_GATE

    def fit(self, spec: TargetSpec, embedder: Any, directory: Path) -> dict[str, Any]:
        ood = fit_ood_detector(spec, embedder)
        ood.save(directory)
        return {"threshold": round(ood.gate_threshold, 4), "heldout_recall": ood.gate_heldout_recall,
                "false_positive_rate": ood.gate_false_positive_rate}

    def bank(self, directories: Mapping[str, Path], embedder: Any) -> OODBank:
        """Artifacts are immutable, so loads are cached by path (= digest)."""
        return OODBank({target_id: _load(path) for target_id, path in directories.items()}, embedder)
