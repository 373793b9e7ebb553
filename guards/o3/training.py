"""O3's unlearning LoRA (Gao et al., 2025; METHODS.md §3): training one adapter per forget target.

Each target gets its own LoRA, fine-tuned on the target's forget questions toward what the served model itself says
about someone it never saw (the default style) or, as an explicit option, toward one polite refusal (O3's TOFU
recipe; both in ``guards.o3.pairs``), with O3's orthogonality penalty against the LoRA-A matrices of all earlier
targets' adapters, so a new request does not overwrite the subspaces earlier requests wrote into (continual
unlearning without retain data):

    L = L_unlearn + λ · mean_layers Σ_modules Σ_{t earlier} ‖A_t A_newᵀ‖_F²

Each adapter is trained on the base model with the earlier adapters merged in: the model the server runs once the
new adapter joins them (serving attaches their rank-stack, ``adapters.stack_adapters``).

Training runs where ``guards.devices.compute_placement`` says: on CUDA the base model is loaded in bfloat16 (the
earlier adapters merged into it in float32 first, then rounded once) and the LoRA, which PEFT keeps in float32, is
trained with a float32 loss; on the CPU everything is float32. Imports no vLLM: ``bench/device_check.py`` runs a
training step on a GPU machine that has only torch, transformers and peft.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from guards.devices import Placement, compute_placement, model_device
from guards.o3.adapters import PEFT_PREFIX, merge_into, read_adapter
from guards.o3.modules import LORA_TARGET_MODULES
from guards.o3.pairs import GENERIC, STYLES, GenericReplies, model_greedy_replies, training_pairs
from guards.training_examples import IGNORE_INDEX, TrainingExample, chat_example, collate

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"
@dataclass(frozen=True)
class O3TrainingConfig:
    """One target's adapter: O3's shape (r=8, α=16, dropout 0.05 on all linear layers) and its optimisation.

    The optimisation is measured on the tiny demo model (forget01: both authors' questions and paraphrases refused
    after ~5 s each on one CPU thread); O3 used lr 2e-4 for 7B models, and 1e-2 is likely too high there.
    """

    rank: int = 8
    lora_alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    epochs: int = 10
    min_steps: int = 60  # few questions make few batches: more epochs then, up to this many optimiser steps
    learning_rate: float = 1e-2
    batch_size: int = 8
    weight_decay: float = 0.1
    orthogonality: float = 0.1  # λ
    max_length: int = 256
    seed: int = 0
    style: str = GENERIC  # one of STYLES
    reply_max_tokens: int = 128  # length of the generic replies asked of the served model

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown O3 training style {self.style!r} (styles: {STYLES})")


# ---- the orthogonality penalty -----------------------------------------------------------------------------------


def orthogonality_penalty(
    new_a: Mapping[str, torch.Tensor], earlier: Sequence[Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """O3's ``mean_layers Σ_modules Σ_t ‖A_t A_newᵀ‖_F²``: how much the new A's rows overlap the earlier ones'.

    Layers are the module paths' numbered prefixes ("model.layers.3"); a module an earlier adapter lacks adds nothing.
    Zero (a scalar) when there are no earlier adapters.
    """
    per_layer: dict[str, torch.Tensor] = {}
    for module, a_new in new_a.items():  # a_new: (r, in)
        layer_sum = per_layer.get(_layer_of(module), a_new.new_zeros(()))
        for a_earlier in earlier:
            if module in a_earlier:
                overlap = a_earlier[module].to(a_new) @ a_new.T  # (r_t, r)
                layer_sum = layer_sum + overlap.pow(2).sum()
        per_layer[_layer_of(module)] = layer_sum
    if not per_layer:
        return torch.zeros(())
    return torch.stack(list(per_layer.values())).mean()


def max_overlap(new_a: Mapping[str, torch.Tensor], earlier: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Largest normalised overlap ‖A_t A_newᵀ‖_F / (‖A_t‖_F ‖A_new‖_F) over modules and earlier adapters (0 if none)."""
    largest = 0.0
    for module, a_new in new_a.items():
        for a_earlier in earlier:
            if module in a_earlier:
                a_t = a_earlier[module].to(a_new)
                norms = a_t.norm() * a_new.norm()
                if norms > 0:
                    largest = max(largest, float((a_t @ a_new.T).norm() / norms))
    return largest


def _layer_of(module: str) -> str:
    match = _LAYER.match(module)
    return match.group(1) if match else module


# ---- training ----------------------------------------------------------------------------------------------------


def unlearning_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the reply tokens (``labels`` as ``collate`` makes them: next tokens), in
    float32 whatever the model's dtype; the batch is moved to the model's device."""
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device)).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=IGNORE_INDEX)


def lora_a_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT model's live LoRA-A weights, keyed like ``load_lora_a``."""
    return {
        name.removeprefix(PEFT_PREFIX): module.lora_A[adapter].weight
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
        for adapter in module.lora_A
    }


def train_unlearning_lora(
    model_dir: Path,
    forget_questions: Sequence[str],
    aliases: Sequence[str],
    earlier_adapters: Sequence[Path],
    config: O3TrainingConfig,
    out_dir: Path,
    progress: Callable[[float, str], None] = lambda f, m: None,
    placement: Placement | None = None,
    *,
    answers: Sequence[str | None] | None = None,
    names: Sequence[str] = (),
    replies: GenericReplies | None = None,
) -> dict[str, Any]:
    """Train one target's unlearning LoRA and save it (unmerged, standard PEFT layout) to ``out_dir``.

    ``config.style`` picks what it learns to answer (``training_pairs``): the generic style asks ``replies`` (the
    served model, unprotected) about an invented entity named after ``aliases`` and ``names`` and checks the replies
    against ``answers`` (the registered forget answers, None where there is none); without ``replies`` the model in
    ``model_dir`` is asked itself, greedily (a worker without the engine).

    The LoRA is trained on the base model in ``model_dir`` with ``earlier_adapters`` merged into it, i.e. on the model
    the server runs under the stacked adapter once this one joins the stack (O3 itself resumes each request from the
    previous adapter); the orthogonality penalty keeps its A matrices off theirs. The initialisation is seeded by
    ``config.seed`` and the questions, so two targets trained with one config do not start from the same A; the same
    inputs always give the same adapter. Returns JSON-safe figures; ``progress(fraction, message)`` once per epoch.
    ``placement`` defaults to ``compute_placement()``: CUDA in bfloat16 when there is one, else the CPU in float32.
    """
    if not forget_questions:
        raise ValueError("an O3 unlearning LoRA needs at least one forget question")
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    placement = placement or compute_placement()
    if config.style == GENERIC and replies is None:
        replies = _local_replies(model_dir, tokenizer, placement, config.reply_max_tokens)
    made = training_pairs(config.style, forget_questions, answers or [None] * len(forget_questions),
                          [*aliases, *names], aliases, replies, config.seed)
    examples = [chat_example(tokenizer, q, reply).truncated(config.max_length) for q, reply in made.pairs]
    examples = [example for example in examples if example.supervised]
    if not examples:
        raise ValueError(f"every forget question fills max_length={config.max_length} tokens before the reply")
    earlier_weights = [read_adapter(Path(path)) for path in earlier_adapters]
    earlier = [{module: a.to(placement.device) for module, a in adapter.a.items()} for adapter in earlier_weights]

    with torch.random.fork_rng(devices=[placement.device] if placement.on_cuda else []):
        torch.manual_seed(_seed_of(config.seed, forget_questions))
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        merge_into(base, earlier_weights)  # in float32, before any rounding to the placement's dtype
        base = base.to(placement.device, placement.dtype)
        model = get_peft_model(base, _lora_config(config, model_dir))
        epochs, final_loss = _fit(model, examples, earlier, config, tokenizer.pad_token_id, progress)

    with torch.no_grad():
        new_a = {module: a.detach() for module, a in lora_a_matrices(model).items()}
        penalty = float(orthogonality_penalty(new_a, earlier))
        overlap = max_overlap(new_a, earlier)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    figures = {
        "style": made.style,
        **made.figures,
        "rank": config.rank,
        "device": str(placement.device),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": epochs,
        "examples": len(examples),
        "final_loss": round(final_loss, 6) if epochs else None,  # no NaN in a job's JSON result
        "orthogonality_penalty": round(penalty, 8),
        "max_overlap": round(overlap, 6),
        "seconds": round(time.monotonic() - start, 3),
    }
    logger.info("O3 unlearning LoRA trained: %s", figures)
    return figures


def _local_replies(model_dir: Path, tokenizer: Any, placement: Placement, max_tokens: int) -> GenericReplies:
    """The base model's own greedy replies, from its files (loaded for the questions, freed after)."""

    def replies(questions: Sequence[str]) -> list[str]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=placement.dtype).to(placement.device).eval()
        try:
            return model_greedy_replies(model, tokenizer, max_tokens)(questions)
        finally:
            del model

    return replies


def _fit(
    model: torch.nn.Module,
    examples: Sequence[TrainingExample],
    earlier: Sequence[Mapping[str, torch.Tensor]],
    config: O3TrainingConfig,
    pad_id: int,
    progress: Callable[[float, str], None],
) -> tuple[int, float]:
    """AdamW on the LoRA parameters, lr decaying linearly to 0; returns (epochs run, last epoch's loss)."""
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(1, epochs * steps_per_epoch))
    order_rng = random.Random(config.seed)
    epoch_loss = float("nan")
    model.train()
    for epoch in range(1, epochs + 1):
        order = list(range(len(examples)))
        order_rng.shuffle(order)
        loss_sum = 0.0
        for first in range(0, len(order), config.batch_size):
            batch = [examples[i] for i in order[first : first + config.batch_size]]
            input_ids, labels = collate(batch, pad_id)
            loss = unlearning_loss(model, input_ids, labels)
            total = loss
            if earlier and config.orthogonality:
                total = loss + config.orthogonality * orthogonality_penalty(lora_a_matrices(model), earlier)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(batch)
        epoch_loss = loss_sum / len(examples)
        progress(epoch / epochs, f"epoch {epoch}/{epochs}: loss {epoch_loss:.4f}")
    model.eval()
    return epochs, epoch_loss


def _lora_config(config: O3TrainingConfig, model_dir: Path) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
    )


def _seed_of(seed: int, questions: Sequence[str]) -> int:
    """A seed for one target: ``seed`` mixed with its questions, so targets differ but runs repeat."""
    digest = hashlib.sha256("\n".join([str(seed), *questions]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


