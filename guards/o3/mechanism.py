"""O3 — OOD detector + orthogonal unlearning LoRA (Gao et al., 2024; METHODS.md §3): the mechanism and its options.

Each target that enables O3 has its own unlearning LoRA (``training.py``; trained orthogonal to every earlier target's)
and its own gate (``ood.py``, fitted with the classifier: ``gate.py``). vLLM applies one adapter per request and has no
per-request scale, so the adapters of every target in a registry snapshot are rank-stacked into ONE adapter
(``stack_adapters``: the stack computes the sum of the targets' updates exactly), built once per snapshot by ``share``
and attached with a ``LoRARequest`` to every request whose prompt opens one of those targets' OOD gates. Orthogonality
is what makes the sum safe: each target's update acts in its own subspace, so forgetting one target does not undo or
disturb another (continual unlearning).

Limit: the stack's rank is the sum of the targets' ranks and must fit ``LETHE_MAX_LORA_RANK`` (vLLM reserves that
much); the registry refuses (422) an O3 registration past it, so the stack always covers every O3 target.
O3 buckets its gate weight into a LoRA scale; here the gate is binary (a calibrated threshold on w, see
``ood.py``), because a vLLM request can carry an adapter but not a scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from classifiers.types import OOD_GATE
from guards.base import (DERIVED_MEMBERS, MechanismBase, MechanismPlan, PlanRequest, SeededOptions, ServingContext,
                         TargetEntry, write_members)
from guards.job_interface import (MODEL_FILES, JobContext, JobHandler, JobResources, JobSpec, ServedModel,
                                  registered_options)
from guards.devices import compute_placement
from guards.o3.gate import OodGate
from guards.o3.modules import LORA_TARGET_MODULES

logger = logging.getLogger(__name__)

O3_NAME = "o3"
O3_TRAIN = "o3_train"
STACKS_DIR = "o3-stacks"
DEFAULT_RANK = 8


class O3Options(SeededOptions):
    rank: Literal[8, 16] = DEFAULT_RANK
    orthogonality: float = Field(0.1, ge=0, description="λ of the orthogonality penalty against earlier LoRAs.")
    style: Literal["generic", "refusal"] = Field(
        "generic", description="What the adapter answers about the target: `generic`, what the served model says "
        "about an invented person asked the same questions (no refusal that tells who filed a request), or "
        "`refusal`, one polite refusal (O3's TOFU recipe).",
    )
    epochs: int | None = Field(None, ge=0, le=200, description="Training epochs of the adapter, exactly; unset: the "
                               "recipe's (training.py). 0 keeps its initial weights: for cost measurements only "
                               "(bench/).")


def training_job(resources: JobResources) -> JobHandler:
    """The ``o3_train`` job: the target's unlearning LoRA, orthogonal to every other target's trained adapter."""
    model_path = resources.model_files(O3_TRAIN)
    placement = compute_placement(getattr(resources.settings, "compute_device", "auto"))

    def run(context: JobContext) -> dict[str, Any]:
        from guards.o3.pairs import GENERIC
        from guards.o3.training import O3TrainingConfig, train_unlearning_lora

        record = context.target
        options = registered_options(record, O3_NAME)
        forget = [item for item in record.forget if item.get("question")]
        forget += [item for item in record.forget if item.get("text") and not item.get("question")]
        questions = [item.get("question") or item["text"] for item in forget]
        earlier = [context.artifacts.path(entry.state["adapter"]) for entry in resources.registrations(O3_NAME)
                   if entry.target_id != record.id and "adapter" in entry.state]
        rank = int(options.get("rank", DEFAULT_RANK))
        config = O3TrainingConfig(rank=rank, lora_alpha=2 * rank,
                                  orthogonality=float(options.get("orthogonality", 0.1)),
                                  style=options.get("style", GENERIC), seed=int(options.get("seed", 0)))
        if options.get("epochs") is not None:
            config = replace(config, epochs=int(options["epochs"]), min_steps=0)
        answers = [item.get("answer") if item.get("question") else None for item in forget]
        replies = served_replies(resources.served, config.reply_max_tokens, f"{context.job_id}-o3")
        staging = context.artifacts.staging_dir()
        figures = train_unlearning_lora(model_path, questions, record.aliases, earlier, config, staging,
                                        context.progress, placement, answers=answers, names=[record.name],
                                        replies=replies)
        return {"adapter": context.artifacts.commit(staging), "earlier_adapters": len(earlier),
                "generic_source": "served_model" if replies else "model_files", **figures}

    return run


def served_replies(served: ServedModel | None, max_tokens: int,
                   tag: str) -> Callable[[Sequence[str]], list[str]] | None:
    """The served model's own greedy replies, unprotected, through the serving pipeline (as ECO's calibration asks
    it), where the job runs in a serving replica; None in a worker without the engine (the training then asks the
    model files)."""
    if served is None:
        return None

    def replies(questions: Sequence[str]) -> list[str]:
        prompts = [served.render_question(question) for question in questions]
        return served.greedy_replies(prompts, [None] * len(prompts), max_tokens, tag)

    return replies


class O3Mechanism(MechanismBase):
    """The O3 mechanism: the snapshot's stacked unlearning adapter, attached when the target's OOD gate opens."""

    name = O3_NAME
    options = O3Options
    jobs = (JobSpec(O3_TRAIN, MODEL_FILES, training_job),)
    gate_detector = OodGate()
    lora_modules = LORA_TARGET_MODULES
    derived_artifacts = (STACKS_DIR,)

    def prepare(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        return (O3_TRAIN,)

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        return "adapter" in state

    def gate(self, options: Mapping[str, Any]) -> str:
        return OOD_GATE

    def admit(self, mine: Mapping[str, Any], others: Sequence[Mapping[str, Any]], settings: Any) -> str | None:
        """Every O3 target's rank must fit the one stacked adapter vLLM can hold (``LETHE_MAX_LORA_RANK``)."""
        max_rank = int(settings.max_lora_rank)
        used = sum(int(other[O3_NAME].get("rank", DEFAULT_RANK)) for other in others if O3_NAME in other)
        wanted = int(mine.get("rank", DEFAULT_RANK))
        if used + wanted > max_rank:
            return (f"O3 adapters of all targets are stacked into one LoRA of rank at most LETHE_MAX_LORA_RANK="
                    f"{max_rank}; {used} is in use, this target needs {wanted} more. Raise LETHE_MAX_LORA_RANK "
                    f"or protect this target with other mechanisms.")
        return None

    def serving(self, context: ServingContext) -> O3Serving:
        return O3Serving(context.artifact_path, context.artifacts_root / STACKS_DIR,
                         int(context.settings.max_lora_rank))


@dataclass(frozen=True)
class O3Stack:
    """The rank-stacked adapter of one registry snapshot and which targets it covers."""

    members: frozenset[str]
    rank: int
    lora_request: Any  # vllm.lora.request.LoRARequest


class O3Serving:
    """Builds the snapshot's stacked adapter (``share``) and attaches it to a hit target's request (``plan``)."""

    def __init__(self, artifact_path: Callable[[str], Path], stacks_root: Path, max_rank: int) -> None:
        self._artifact_path = artifact_path
        self._stacks_root = stacks_root
        self._max_rank = max_rank
        self._lock = threading.Lock()

    def check(self, entry: TargetEntry) -> None:
        """Read the target's adapter; raises if this replica cannot (it is then left out of the stack)."""
        if "adapter" in entry.state:
            from guards.o3.adapters import read_adapter

            read_adapter(self._artifact_path(entry.state["adapter"]))

    def share(self, entries: Sequence[TargetEntry]) -> O3Stack | None:
        """Build (or find) the stacked adapter of every ready O3 target; runs where snapshots load, not per request."""
        ready = sorted((entry for entry in entries if "adapter" in entry.state),
                       key=lambda entry: entry.state["adapter"])
        budget, fitting = self._max_rank, []
        for entry in ready:  # the registry's admission check keeps this from dropping any; a race could not
            rank = int(entry.options.get("rank", DEFAULT_RANK))
            if rank > budget:
                logger.error("o3.stack_full", extra={"target_id": entry.target_id, "max_rank": self._max_rank})
                continue
            budget -= rank
            fitting.append(entry)
        ready = fitting
        if not ready:
            return None
        digests = [entry.state["adapter"] for entry in ready]
        key = hashlib.sha256("|".join(digests).encode()).hexdigest()
        directory = self._stacks_root / key
        with self._lock:
            if not (directory / "adapter_config.json").exists():
                self._build(directory, digests)
            elif not (directory / DERIVED_MEMBERS).exists():  # built before stacks recorded their members
                write_members(directory, digests)
        from vllm.lora.request import LoRARequest

        rank = int(json.loads((directory / "adapter_config.json").read_text())["r"])
        request = LoRARequest(lora_name=f"o3-{key[:16]}", lora_int_id=int(key[:12], 16) + 1, lora_path=str(directory))
        logger.info("o3.stack", extra={"targets": len(ready), "rank": rank, "adapter": key[:16]})
        return O3Stack(frozenset(entry.target_id for entry in ready), rank, request)

    def _build(self, directory: Path, digests: Sequence[str]) -> None:
        """Write the stack to a temporary sibling and rename it into place: readers never see half an adapter. Its
        members file lets the erasure pass delete it once one of its adapters is purged (a deleted target's)."""
        from guards.o3.adapters import stack_adapters

        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory.parent))
        try:
            stack_adapters([self._artifact_path(digest) for digest in digests], staging)
            write_members(staging, digests)
            os.rename(staging, directory)
        except OSError:
            if not directory.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def plan(self, request: PlanRequest) -> MechanismPlan:
        stack: O3Stack | None = request.shared
        if stack is None or request.hit.target_id not in stack.members:
            raise RuntimeError(f"target {request.hit.target_id} is not in this snapshot's O3 stack")
        return MechanismPlan(lora=stack.lora_request)


O3 = O3Mechanism()
