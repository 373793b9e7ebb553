"""The trained mechanisms' registration jobs: ULD's assistant (``uld_train``) and O3's unlearning LoRA (``o3_train``).

Both train on the served model's weights (read from its directory, never from the engine), so any worker that has the
model directory runs them: the serving replica's embedded worker, or ``lethe worker`` on a training box. The result is
a content-addressed artifact whose digest becomes the mechanism's published state; replicas pick it up on their next
snapshot, and the target's ECO/GUARD keep protecting it meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guards.o3 import O3Guard
from server.jobs import JobContext, JobHandler
from server.registry.records import TargetRecord
from server.registry.targets import TargetStore

logger = logging.getLogger(__name__)


def uld_train_handler(model_path: Path) -> JobHandler:
    """Train the target's ULD assistant (remember the forget set, uniform on the rest) and store it merged."""

    def run(context: JobContext) -> dict[str, Any]:
        from guards.uld_training import UldTrainingConfig, train_assistant

        record = context.target
        options = record.mechanisms.get("uld", {}).get("options", {})
        forget = [(item["question"], item["answer"]) for item in record.forget if item.get("question")]
        retain = [(item.get("question"), item.get("answer") or item.get("text", "")) for item in record.retain]
        staging = context.artifacts.staging_dir()
        figures = train_assistant(model_path, forget, retain, record.aliases,
                                  UldTrainingConfig(layers=options.get("layers")), staging, context.progress)
        return {"assistant": context.artifacts.commit(staging), **figures}

    return run


def earlier_o3_adapters(store: TargetStore, target_id: str, artifact_path: Callable[[str], Path]) -> list[Path]:
    """Every other target's trained O3 adapter: the new one is trained orthogonal to all of them."""
    _, records = store.snapshot_rows()
    return [artifact_path(state["adapter"]) for record in records if record.id != target_id
            for state in [_o3_state(record)] if O3Guard.ready({}, state)]


def _o3_state(record: TargetRecord) -> dict[str, Any]:
    return (record.mechanisms.get(O3Guard.name) or {}).get("state") or {}


def o3_train_handler(model_path: Path, store: TargetStore) -> JobHandler:
    """Train the target's O3 unlearning LoRA toward refusals, orthogonal to the earlier targets' adapters."""

    def run(context: JobContext) -> dict[str, Any]:
        from guards.o3_training import O3TrainingConfig, train_unlearning_lora

        record = context.target
        options = record.mechanisms.get(O3Guard.name, {}).get("options", {})
        questions = [item["question"] for item in record.forget if item.get("question")]
        questions += [item["text"] for item in record.forget if item.get("text") and not item.get("question")]
        earlier = earlier_o3_adapters(store, record.id, context.artifacts.path)
        rank = int(options.get("rank", 8))
        config = O3TrainingConfig(rank=rank, lora_alpha=2 * rank,
                                  orthogonality=float(options.get("orthogonality", 0.1)))
        staging = context.artifacts.staging_dir()
        figures = train_unlearning_lora(model_path, questions, record.aliases, earlier, config, staging,
                                        context.progress)
        return {"adapter": context.artifacts.commit(staging), "earlier_adapters": len(earlier), **figures}

    return run
