"""ECO — Embedding-COrrupted prompts (Liu et al., NeurIPS 2024; METHODS.md §1): the mechanism and its options.

A prompt flagged as being about a target reaches the model with the embeddings of the target's entity tokens
corrupted (``corruption.py``), so the model cannot retrieve what it knows about the entity; unflagged prompts are never
touched. The corrupted tensor goes to vLLM as ``prompt_embeds`` together with the token ids (and
``prompt_is_token_ids`` all False), so the logits processor still sees the ids (VLLM_NOTES §2). σ, when not given, is
found by ECO's zeroth-order search run by the ``eco_calibrate`` job against the served model (``calibration.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from guards.base import (MechanismBase, MechanismPlan, NothingShared, PlanRequest, SeededOptions, ServingContext,
                         corruption_seed)
from guards.job_interface import SERVED_MODEL, JobSpec
from guards.eco.calibration import ECO_CALIBRATE, ECO_NAME, calibration_job
from guards.eco.corruption import ENTITIES, RAND_NOISE_FIRST_N, EcoEdit, corrupted_positions


class EcoOptions(SeededOptions):
    corruption: Literal["rand_noise_first_n", "zero_out_top_k", "flip_sign_top_k"] = "rand_noise_first_n"
    sigma: float | None = Field(None, gt=0, description="Noise scale; unset means found by the calibration job.")
    dims: int | None = Field(
        None, ge=1, description="Embedding dims corrupted (first n / top k); unset: all (zero_out_top_k: a quarter)."
    )
    scope: Literal["auto", "entities", "prompt"] = Field(
        "auto", description="Which prompt tokens are corrupted: the target's entity tokens (ECO's TOFU setting), every "
        "user token but the last (its WMDP setting), or `auto`: the least invasive one that reaches the calibration "
        "goal (entities when sigma is given).",
    )
    goal: float | None = Field(
        None, ge=0, le=1, description="Forget-answer ROUGE-L the sigma calibration aims for; unset: the level of an "
        "answer about an unrelated author.",
    )
    noise_key: str | None = Field(
        None, min_length=1, max_length=200, description="Keys the noise in place of the target id (random, unknown "
        "to clients), so that two registrations draw the same noise for a prompt: for reproducible evaluations "
        "(`lethe eval tofu` sets it from its seed). Anyone who knows it and holds the weights can compute the noise.",
    )


def scope_of(options: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """The corruption scope as registered, else as calibrated (``entities`` when nothing decided)."""
    scope = options.get("scope", "auto")
    return scope if scope != "auto" else state.get("scope", ENTITIES)


def noise_seed(options: Mapping[str, Any], request: PlanRequest) -> int:
    """The seed of one prompt's noise: the request's (keyed by the target id, ``guards.base.corruption_seed``), or
    keyed by the registered ``noise_key``. The planner's and the σ calibration's requests both come through here, so
    the calibration measures the noise that is served."""
    key = options.get("noise_key")
    return corruption_seed(request.prompt.token_ids, key) if key else request.seed


def sigma_of(options: Mapping[str, Any], state: Mapping[str, Any]) -> float | None:
    """σ as registered, else as calibrated."""
    sigma = options.get("sigma")
    return float(sigma) if sigma is not None else state.get("sigma")


class Eco(MechanismBase):
    """The ECO mechanism: ``prompt_embeds`` with the target's entity tokens corrupted."""

    name = ECO_NAME
    options = EcoOptions
    jobs = (JobSpec(ECO_CALIBRATE, SERVED_MODEL, calibration_job),)

    def prepare(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        needs_sigma = options.get("corruption", RAND_NOISE_FIRST_N) == RAND_NOISE_FIRST_N
        return (ECO_CALIBRATE,) if needs_sigma and options.get("sigma") is None else ()

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        return sigma_of(options, state) is not None or not self.prepare(options)

    def serving(self, context: ServingContext) -> EcoServing:
        return EcoServing(context.tokenizer)


class EcoServing(NothingShared):
    """Plans one corruption per hit target: which positions, how, with the request's seed."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))

    def plan(self, request: PlanRequest) -> MechanismPlan:
        options, state = request.hit.options, request.hit.state
        edit = EcoEdit(
            positions=corrupted_positions(self._tokenizer, request.prompt, request.hit.alias_spans, self._special_ids,
                                          scope_of(options, state)),
            corruption=options.get("corruption", RAND_NOISE_FIRST_N),
            sigma=sigma_of(options, state),
            dims=options.get("dims"),
            seed=noise_seed(options, request),
        )
        return MechanismPlan(embedding_edits=(edit,))
