"""The smallest complete mechanism, kept as the example of docs/adding-a-mechanism.md: SILENCE ends a hit target's
reply before its first token. A real one would live in ``guards/silence/`` and be one more entry in
``guards.mechanisms.MECHANISMS``."""

from __future__ import annotations

from typing import Any

import torch

from guards.base import MechanismBase, MechanismPlan, NothingShared, Options, PlanRequest, RowHooks, ServingContext


class SilenceOptions(Options):
    """No options: any given is refused (422), like every mechanism's unknown option."""


class EndOfSequence:
    """Row hook: only the end-of-sequence token may follow."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos = eos_token_id

    def apply(self, logits_row: torch.Tensor) -> None:
        logits_row.fill_(float("-inf"))
        logits_row[self.eos] = 0.0


class SilenceServing(NothingShared):
    def plan(self, request: PlanRequest) -> MechanismPlan:
        return MechanismPlan(processor_args={})  # an (empty) payload marks the row for the hook


class Silence(MechanismBase):
    name = "silence"
    options = SilenceOptions
    jobs = ()  # nothing to prepare: ready as soon as it is registered
    row_hooks = RowHooks(
        resources=lambda tokenizer, placement: int(tokenizer.eos_token_id) if tokenizer is not None else 0,
        validate=lambda section: None,
        build=lambda section, prompt_ids, output_ids, eos: EndOfSequence(eos) if section.get("silence") else None,
    )

    def prepare(self, options: Any) -> tuple[str, ...]:
        return ()

    def ready(self, options: Any, state: Any) -> bool:
        return True

    def serving(self, context: ServingContext) -> SilenceServing:
        return SilenceServing()


SILENCE = Silence()
