"""ULD — Unlearning from Logit Difference (Ji et al., 2024; METHODS.md §4): the mechanism and its options.

The target's trained assistant (``training.py``: remembers the forget set, near-uniform elsewhere) is subtracted from
the served model's logits in the logits processor (``assistant.py``, ``logits.py``). Gate: the prompt classifier by
default; ``gate: always`` applies it to every request, as in the paper (the assistant is near-uniform off its forget
set, so the difference is nearly neutral there, but not free).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from classifiers.types import ALWAYS_GATE, CLASSIFIER_GATE
from guards.base import (MechanismBase, MechanismPlan, NotReady, PlanRequest, RowHooks, SeededOptions, ServingContext,
                         TargetEntry)
from guards.job_interface import MODEL_FILES, JobContext, JobHandler, JobResources, JobSpec, registered_options
from guards.devices import assistant_placement, compute_placement
from guards.model_identity import model_identity
from guards.uld.assistant import ULD_KEY, uld_row_hook, validate_uld_section
from guards.uld.cache import DEFAULT_MEMORY_BYTES, AssistantModels, check_assistant
from guards.uld.warmup import AssistantWarmup, Warm
from guards.uld.logits import DEFAULT_ALPHA, DEFAULT_TAU

ULD_TRAIN = "uld_train"


class UldOptions(SeededOptions):
    alpha: float | None = Field(None, gt=0, le=5, description="Weight of the assistant's logits; unset: calibrated "
                                "per target against the served model on an invented stand-in (calibration.py).")
    layers: int | None = Field(None, ge=1, description="Assistant depth; unset: a quarter of the model's layers.")
    epochs: int | None = Field(None, ge=0, le=200, description="Training epochs of the assistant; unset: the recipe's "
                               "(training.py). 0 keeps its initial weights: for cost measurements only (bench/).")
    tau: float = Field(DEFAULT_TAU, gt=0, lt=1)
    gate: Literal["classifier", "always"] = "classifier"


def training_job(resources: JobResources) -> JobHandler:
    """The ``uld_train`` job: train the target's assistant on the served model's files and store it merged, then
    calibrate α (unless registered). An assistant the target already has from the same training inputs is kept and
    only α recalibrated: what a change beneath ULD (``guards.stacking``) or to α, τ or the gate needs."""
    model_path = resources.model_files(ULD_TRAIN)

    placement = compute_placement(getattr(resources.settings, "compute_device", "auto"))

    def run(context: JobContext) -> dict[str, Any]:
        from guards.uld.training import UldTrainingConfig, train_assistant

        record = context.target
        options = registered_options(record, ULD_KEY)
        forget = [(item["question"], item["answer"]) for item in record.forget if item.get("question")]
        retain = [(item.get("question"), item.get("answer") or item.get("text", "")) for item in record.retain]
        config = UldTrainingConfig(layers=options.get("layers"), seed=int(options.get("seed", 0)))
        if options.get("epochs") is not None:
            config = replace(config, epochs=int(options["epochs"]))
        model = model_identity(model_path)
        key = training_key(forget, retain, record.aliases, config, model)
        kept = kept_assistant(record, key, context.artifacts.path)
        digest: str | None = None
        if kept is not None:
            digest, assistant_dir, figures = kept
        else:
            assistant_dir = context.artifacts.staging_dir()
            figures = train_assistant(model_path, forget, retain, record.aliases, config, assistant_dir,
                                      lambda fraction, message: context.progress(0.8 * fraction, message), placement)
        if options.get("alpha") is None:
            from guards.never_seen import entity_names
            from guards.uld.calibration import calibrate_alpha

            figures |= calibrate_alpha(model_path, assistant_dir, forget, entity_names(record.name, record.aliases),
                                       float(options.get("tau", DEFAULT_TAU)), config.seed, placement,
                                       lambda message: context.progress(0.9, f"calibrating alpha: {message}"),
                                       context.check_cancelled, resources.beneath(record, ULD_KEY))
        if digest is None:
            digest = context.artifacts.commit(assistant_dir)
        # (a job's result is merged into the published state: every run says whether it kept the assistant)
        return {"assistant": digest, "training_key": key, "assistant_kept": kept is not None, "model": model, **figures}

    return run


TRAINING_FIGURES = ("layers", "device", "trainable_parameters", "epochs", "examples", "final_nll", "final_uniform_kl",
                    "seconds")


def training_key(forget: Sequence[tuple[str, str]], retain: Sequence[tuple[str | None, str]], aliases: Sequence[str],
                 config: Any, model: str) -> str:
    """What the assistant is a function of: its data, its training options and the served model it starts from
    (``model``: ``guards.model_identity``), so a model served in another's place retrains it."""
    payload = json.dumps({"forget": forget, "retain": retain, "aliases": list(aliases), "config": asdict(config),
                          "model": model}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def kept_assistant(record: Any, key: str, artifact_path: Callable[[str], Path]
                   ) -> tuple[str, Path, dict[str, Any]] | None:
    """The target's published assistant (digest, directory, its training figures) when it was trained from ``key``
    and is still stored, else None."""
    state = (record.mechanisms.get(ULD_KEY) or {}).get("state") or {}
    digest = state.get("assistant")
    if state.get("training_key") != key or not digest or not artifact_path(digest).is_dir():
        return None
    return digest, artifact_path(digest), {name: state[name] for name in TRAINING_FIGURES if name in state}


def alpha_of(options: Mapping[str, Any], state: Mapping[str, Any]) -> float:
    """The registered α, else the one the target's training job calibrated, else the paper's default."""
    if options.get("alpha") is not None:
        return float(options["alpha"])
    return float(state.get("alpha", DEFAULT_ALPHA))


class Uld(MechanismBase):
    """The ULD mechanism: the target's assistant is subtracted from the served model's logits."""

    name = ULD_KEY
    options = UldOptions
    jobs = (JobSpec(ULD_TRAIN, MODEL_FILES, training_job),)
    # The assistants run where the logits are, in the dtype ``assistant_placement`` picks (bfloat16 on a CPU that
    # multiplies it natively): in the engine and on the scoring path alike, as the calibration measured them.
    row_hooks = RowHooks(resources=lambda tokenizer, placement: AssistantModels(
                             placement=assistant_placement(placement)),
                         validate=validate_uld_section, build=uld_row_hook,
                         engine_resources=lambda tokenizer, placement: AssistantModels(
                             block_on_miss=False, placement=assistant_placement(placement)),
                         warm=lambda assistants, request: assistants.warm(request))

    def prepare(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        return (ULD_TRAIN,)

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        return "assistant" in state

    def calibrated_on(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """A calibrated α is measured on top of GUARD where the target has it (``guards.stacking``); GUARD comes
        before ULD in the logits processor, whatever ULD's α."""
        return ("guard",) if options.get("alpha") is None else ()

    def gate(self, options: Mapping[str, Any]) -> str:
        return ALWAYS_GATE if options.get("gate") == ALWAYS_GATE else CLASSIFIER_GATE

    def serving(self, context: ServingContext) -> UldServing:
        memory = getattr(context.settings, "uld_assistant_memory_gib", None)
        return UldServing(context.artifact_path, context.warm,
                          int(memory * 1024**3) if memory is not None else DEFAULT_MEMORY_BYTES)


class UldServing:
    """Plans the assistant (by artifact path), α and τ of each hit target, once the engine has loaded it."""

    def __init__(self, artifact_path: Callable[[str], Path], warm: Warm | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self._artifact_path = artifact_path
        self._warmup = AssistantWarmup(warm, memory_bytes) if warm is not None else None

    def share(self, entries: Sequence[TargetEntry]) -> AssistantWarmup | None:
        """Have the engine load the snapshot's assistants (``warmup.py``); None where no engine runs (they then load
        on first use, outside any decoding step)."""
        if self._warmup is None:
            return None
        return self._warmup.want([str(self._artifact_path(entry.state["assistant"])) for entry in entries
                                  if "assistant" in entry.state])

    def check(self, entry: TargetEntry) -> None:
        """Read the assistant's config and weights header (not the weights: the engine process loads those);
        raises if this replica cannot."""
        if "assistant" in entry.state:
            check_assistant(self._artifact_path(entry.state["assistant"]))

    def plan(self, request: PlanRequest) -> MechanismPlan:
        options = request.hit.options
        assistant = self._artifact_path(request.hit.state["assistant"])
        warmup: AssistantWarmup | None = request.shared
        if warmup is not None and not warmup.loaded(str(assistant)):
            raise NotReady(f"the assistant of {request.hit.target_id} is still loading in the engine")
        return MechanismPlan(processor_args={"assistant": str(assistant), "alpha": alpha_of(options, request.hit.state),
                                             "tau": float(options.get("tau", DEFAULT_TAU))})


ULD = Uld()
