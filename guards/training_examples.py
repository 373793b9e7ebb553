"""Supervised examples in the served chat format and their batches: the one collate of every training loop (ULD's
assistant, O3's adapters, the demo model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guards.chat import encode_rendered, render_chat

IGNORE_INDEX = -100  # labels of positions that carry no loss (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class TrainingExample:
    """Token ids and the index of the first supervised token: everything before it is context only."""

    ids: tuple[int, ...]
    first_target: int

    @property
    def supervised(self) -> bool:
        return len(self.ids) > self.first_target

    def truncated(self, max_length: int) -> TrainingExample:
        return TrainingExample(self.ids[:max_length], self.first_target)


def chat_example(tokenizer: Any, question: str, answer: str) -> TrainingExample:
    """``[user question, assistant answer]`` as the server renders it; the answer part (after the prompt) supervised."""
    prompt_ids = encode_rendered(tokenizer, render_chat(tokenizer, [("user", question)]))
    full_ids = encode_rendered(tokenizer, render_chat(tokenizer, [("user", question), ("assistant", answer)],
                                                      add_generation_prompt=False))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template's rendered conversation does not extend its generation prompt")
    return TrainingExample(tuple(full_ids), len(prompt_ids))


def collate(examples: Sequence[TrainingExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and next-token labels [B, T] (``IGNORE_INDEX`` where nothing is supervised).

    labels[b, t] is the token at t + 1 when that token is supervised, so position t's logits predict it. Right padding
    under a causal mask never affects real positions, so no attention mask is needed.
    """
    width = max(len(ex.ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex.ids)] = torch.tensor(ex.ids)
        if ex.supervised:
            labels[row, ex.first_target - 1 : len(ex.ids) - 1] = torch.tensor(ex.ids[ex.first_target :])
    return input_ids, labels
