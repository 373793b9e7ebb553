"""What the in-process serving benchmarks share about targets: registering TOFU authors as a client would, waiting
until a replica serves them, and re-planning a hit request with only some mechanisms.

A request is re-planned rather than the registry changed between variants, so that every variant of a round serves the
same registered targets with the same trained artifacts; "unprotected" sends the same request as plain token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from bench.classifier_latency import synthesise_heads
from classifiers import ClassifierBank
from classifiers.negatives import builtin_negative_pool
from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.classifier_jobs import _load_prompt_artifact
from server.planner import ChatTurn, plain_plan
from server.registry.records import NewTarget
from server.registry.snapshot import RegistrySnapshot
from server.run import ChatPrompt
from server.runtime import Runtime

ALL_FOUR = ("eco", "guard", "uld", "o3")
# Each mechanism alone, the default set and all four; None: the same request unprotected.
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "unprotected": None, "eco": ("eco",), "guard": ("guard",), "uld": ("uld",), "o3": ("o3",),
    "eco+guard": ("eco", "guard"), "all four": ALL_FOUR}
SYNTHETIC_TARGETS = 100


def target_body(author: Any, retain_authors: Any,
                mechanisms: tuple[str, ...] | Mapping[str, Mapping[str, Any]] = ALL_FOUR) -> NewTarget:
    """An author registered by name with their question/answer pairs as forget items; ``mechanisms`` names them (with
    default options) or maps each to its options."""
    options = mechanisms if isinstance(mechanisms, Mapping) else {name: {} for name in mechanisms}
    return new_target(TargetCreate.model_validate({
        "name": author.name, "aliases": [author.name],
        "forget": [{"question": i.question, "answer": i.answer} for i in author.items],
        "retain": [{"question": i.question, "answer": i.answer} for a in retain_authors for i in a.items],
        "mechanisms": {name: dict(values) for name, values in options.items()},
    }), default_mechanisms=())


async def wait_until_served(runtime: Runtime, target_ids: list[str]) -> None:
    targets, snapshots = runtime.control.registry.targets, runtime.control.snapshots
    while True:
        statuses = [targets.get(tid).status for tid in target_ids]
        if {"failed", "degraded"} & set(statuses):
            raise RuntimeError(f"target preparation failed: {statuses}")
        if all(s == "active" for s in statuses) and snapshots.current.revision == targets.revision():
            return
        await asyncio.sleep(1)


def only(snapshot: RegistrySnapshot, mechanisms: tuple[str, ...]) -> RegistrySnapshot:
    """The snapshot with each target's mechanisms restricted to ``mechanisms``."""
    targets = {tid: replace(record, mechanisms={k: v for k, v in record.mechanisms.items() if k in mechanisms})
               for tid, record in snapshot.targets.items()}
    return replace(snapshot, targets=targets)


def question(text: str) -> ChatPrompt:
    """One user question, rendered by the pipeline as a chat request is."""
    return ChatPrompt((ChatTurn("user", text),))


def replan_run(runtime: Runtime, run: Any, mechanisms: tuple[str, ...] | None) -> None:
    """Re-plan a started (hit) run with only ``mechanisms``, or as plain token ids ("unprotected") when None."""
    prompt = run.prompts[0]
    if mechanisms is None:
        run.plans = [plain_plan(prompt)]
    else:
        run.snapshot = only(run.snapshot, mechanisms)
        run.plans = [runtime.pipeline.plan(run, 0)]


def hundred_targets(snapshot: RegistrySnapshot, runtime: Runtime) -> RegistrySnapshot:
    """The snapshot's gate with SYNTHETIC_TARGETS heads: the registered ones plus synthetic heads with made-up names
    whose thresholds sit above every negative (what unflagged traffic pays is measured, not false positives)."""
    real = [_load_prompt_artifact(runtime.control.artifacts.path(record.classifier["artifact"]))
            for record in snapshot.targets.values()]
    embedder = runtime.control.embedder()
    negatives = embedder.encode([n.text for n in builtin_negative_pool()])
    heads = synthesise_heads(real, SYNTHETIC_TARGETS, negatives)
    for key, head in list(heads.items()):
        if key.startswith("synthetic"):
            logit = np.log(head.threshold / (1 - head.threshold))
            heads[key] = replace(head, bias=float(logit - (negatives @ head.weights).max() - 1.0))
    return replace(snapshot, bank=ClassifierBank.from_artifacts(heads, embedder))
