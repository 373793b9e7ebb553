"""The retain-only model, measured in-process: TOFU's gold standard for Forget Quality and Model Utility.

It is never served, so it has no guards and no classifier; its losses come from the very scorer class the server
uses (``server.scoring.GuardedScorer``, with a plan that carries only the prompt's token ids), so the served and the
reference truth ratios differ only in the model and what protects it, not in how they are computed. It runs where
``guards.devices.compute_placement`` says: CUDA in bfloat16 when there is one, else the CPU in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from guards.chat import chat_prompt_ids
from guards.devices import Placement, compute_placement
from server.guarded_scorer import GuardedScorer
from server.planner import EnginePlan


class ReferenceModel:
    """Greedy replies and answer losses of an HF model directory, prompts rendered with its chat template."""

    def __init__(self, model_dir: Path, max_tokens: int, placement: Placement | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._placement = placement or compute_placement()
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self._placement.dtype)
        self._model = model.to(self._placement.device).eval()
        self._scorer = GuardedScorer(model_dir, self._tokenizer, self._placement)
        self._max_tokens = max_tokens

    def _prompt_ids(self, question: str) -> list[int]:
        return chat_prompt_ids(self._tokenizer, question)

    def replies(self, questions: list[str]) -> list[tuple[str, str | None]]:
        out = []
        for question in questions:
            ids = torch.tensor([self._prompt_ids(question)], device=self._placement.device)
            with torch.inference_mode():
                generated = self._model.generate(ids, max_new_tokens=self._max_tokens, do_sample=False,
                                                 pad_token_id=self._tokenizer.eos_token_id)
            out.append((self._tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True), None))
        return out

    def losses(self, question: str, continuations: list[str]) -> list[float]:
        plan = EnginePlan(prompt={"prompt_token_ids": self._prompt_ids(question)})
        return [self._scorer.score(plan, self._tokenizer.encode(text, add_special_tokens=False)).mean_loss
                for text in continuations]

    def hits(self) -> None:
        return None
