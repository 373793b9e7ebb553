"""Scoring answers under the guards: the log-probability of a given continuation as the protected model sees it.

TOFU's metrics (truth ratio, Forget Quality, Model Utility's probability) need the probability of fixed answers, and
vLLM's prompt logprobs are computed before any logits processor runs: they would score the unprotected model. So the
evaluation scores on this in-process path instead, from the very ``EnginePlan`` the planner made for the prompt:

- the prompt goes in as the plan has it: token ids, or ECO's corrupted ``prompt_embeds`` (answer tokens are embedded
  plainly, as the engine embeds generated tokens);
- O3's stacked LoRA, when the plan carries one, is the adapter PEFT applies to the HF copy of the model;
- each answer position's logits pass through the same row hooks the engine's logits processor builds
  (``guards.row_hooks.build_row_hooks``: GUARD's bans, then ULD's difference), fed the answer token by token exactly
  as they would see sampled tokens.

The HF copy of the served weights is loaded on first use: scoring is for evaluation, and a serving replica that never
scores never pays for it. It runs where ``guards.devices.compute_placement`` says (CUDA in bfloat16 when there is one,
else the CPU in float32); the answer logits stay on that device, upcast to float32 for the hooks and the log-softmax.
A token a guard banned has log-probability −inf; it is floored at ``guards.probe.LOGPROB_FLOOR`` so that losses and
truth ratios
stay finite.

Imports neither vLLM nor the rest of the server: ``bench/device_check.py`` runs this scorer on a GPU machine that has
only torch, transformers and peft (the mechanisms' row hooks are imported for a plan that carries a Lethe section).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guards.devices import Placement, compute_placement
from guards.probe import hooked_logprobs

if TYPE_CHECKING:
    from server.planner import EnginePlan

logger = logging.getLogger(__name__)

CACHED_ADAPTERS = 2  # O3 stacks are one per registry revision; the newest two cover a revision change mid-evaluation


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token log-probabilities of one continuation after one prompt."""

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]

    @property
    def logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def mean_loss(self) -> float:
        """Length-normalised negative log-likelihood: TOFU's per-answer loss."""
        return -self.logprob / max(1, len(self.token_logprobs))


class GuardedScorer:
    """Scores continuations of planned prompts on an HF copy of the served model, guards applied."""

    def __init__(self, model_dir: Path, tokenizer: Any, placement: Placement | None = None) -> None:
        self._model_dir = Path(model_dir)
        self._tokenizer = tokenizer
        self._placement = placement or compute_placement()
        self._model: Any = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter path -> PEFT adapter name
        self._adapter_names = itertools.count()
        self._lock = threading.Lock()
        self._hook_resources: dict[str, Any] | None = None  # built for the first plan that carries a Lethe section

    @property
    def placement(self) -> Placement:
        return self._placement

    def score(self, plan: EnginePlan, continuation_ids: Sequence[int]) -> ContinuationScore:
        """Teacher-forced log-probabilities of ``continuation_ids`` after the plan's prompt (one forward pass)."""
        if not continuation_ids:
            raise ValueError("a continuation needs at least one token")
        prompt_ids = list(plan.prompt["prompt_token_ids"])
        answer = list(continuation_ids)
        with self._lock, torch.inference_mode():
            model = self._model_for(plan)
            rows = self._answer_logits(model, plan, prompt_ids, answer)  # (A, V) float32, on the model's device
            output: list[int] = []  # grows token by token, as the engine's live output list does
            values = hooked_logprobs(rows, answer, self._hooks(plan, prompt_ids, output), output)
        return ContinuationScore(tuple(answer), tuple(values))

    def _hooks(self, plan: EnginePlan, prompt_ids: list[int], output: list[int]) -> list[Any]:
        """The engine's row hooks for the plan's Lethe section (none without one)."""
        if not plan.extra_args:
            return []
        from guards.row_hooks import EXTRA_ARGS_KEY, build_row_hooks, row_hook_resources

        section = plan.extra_args.get(EXTRA_ARGS_KEY)
        if not section:
            return []
        if self._hook_resources is None:
            self._hook_resources = row_hook_resources(self._tokenizer, self._placement)
        return build_row_hooks(section, prompt_ids, output, self._hook_resources)

    def _answer_logits(self, model: Any, plan: EnginePlan, prompt_ids: list[int], answer: list[int]) -> torch.Tensor:
        """The logits that predict each answer token: positions P-1 .. P+A-2 of the joint sequence, in float32."""
        device = self._placement.device
        embeds = plan.prompt.get("prompt_embeds")
        if embeds is None:
            out = model(input_ids=torch.tensor([prompt_ids + answer], device=device))
        else:
            answer_embeds = model.get_input_embeddings()(torch.tensor(answer, device=device))  # (A, hidden)
            prompt_embeds = embeds.to(device=device, dtype=answer_embeds.dtype)  # (P, hidden)
            joint = torch.cat([prompt_embeds, answer_embeds], dim=0)  # (P+A, hidden)
            out = model(inputs_embeds=joint.unsqueeze(0))
        start = len(prompt_ids) - 1
        return out.logits[0, start:start + len(answer)].float()

    def _model_for(self, plan: EnginePlan) -> Any:
        """The HF model with the plan's LoRA active, or with every adapter disabled when it has none."""
        base = self._load()
        lora = plan.lora_request
        if lora is None:
            if hasattr(base, "disable_adapter_layers"):
                base.disable_adapter_layers()
            return base
        path = str(lora.lora_path)
        if path not in self._adapters:
            self._model = base = self._load_adapter(base, path)
        self._adapters.move_to_end(path)
        base.enable_adapter_layers()
        base.set_adapter(self._adapters[path])
        return base

    def _load(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=self._placement.dtype)
            self._model = model.to(self._placement.device).eval()
            logger.info("scoring.model_loaded", extra={"model": str(self._model_dir),
                                                       "device": str(self._placement.device)})
        return self._model

    def _load_adapter(self, base: Any, path: str) -> Any:
        from peft import PeftModel

        name = f"stack{next(self._adapter_names)}"
        device = str(self._placement.device)
        if isinstance(base, PeftModel):
            base.load_adapter(path, adapter_name=name, torch_device=device)
        else:
            base = PeftModel.from_pretrained(base, path, adapter_name=name, torch_device=device).eval()
        self._adapters[path] = name
        while len(self._adapters) > CACHED_ADAPTERS:
            _, evicted = self._adapters.popitem(last=False)
            base.delete_adapter(evicted)
        logger.info("scoring.adapter_loaded", extra={"path": path})
        return base
