"""Training and greedy evaluation for the demo model, sized for two CPU cores.

Throughput decides what the model can learn in the time budget, so the loop avoids waste: examples are bucketed by
length into token-budget batches (little padding) and the LM head runs only on loss-bearing positions. Training is
plain float32: on AVX2-only CPUs (no AVX512-BF16) `torch.autocast("cpu", bfloat16)` measured 20x slower, and
`torch.compile` won ~20% per step but cost ~90 s of compilation, more than it saves here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from demo.corpus import Format, Source, TextExample, TokenExample
from demo.tofu_data import QAItem
from guards.chat import render_chat
from guards.text_metrics import rouge_l_recall
from guards.training_examples import IGNORE_INDEX, collate

logger = logging.getLogger(__name__)

# Demo tokenizer's rate and the chat template's tokens per example (fit on the full corpus; see expected_epoch_tokens).
CHARS_PER_TOKEN = 4.6
TEMPLATE_TOKENS = 12


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters; part of the cache key."""

    epochs: int
    peak_lr: float
    warmup_fraction: float  # of all steps, linear from 0 to peak_lr
    final_lr_fraction: float  # cosine decays from peak_lr to peak_lr * this
    batch_tokens: int  # token budget per batch, padding included
    text_fraction: float  # share of the completion-style QA examples drawn each epoch
    bio_fraction: float = 1.0  # share of the biography examples drawn each epoch
    mined_fraction: float = 1.0  # share of the mined-phrasing examples drawn each epoch
    question_noise: float = 0.0  # chance that one use of an example has its question noised
    word_drop: float = 0.0  # in a noised question, chance that a word is deleted
    word_shuffle: int = 0  # in a noised question, how far a word may move
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens: int  # real (unpadded) tokens processed
    seconds: float
    final_loss: float  # mean loss over the last epoch's loss tokens


def plan_batches(examples: Sequence[TokenExample], config: TrainConfig) -> list[list[list[int]]]:
    """All batches of the run ([epoch][batch] -> example indices), fixed up front so the LR schedule and progress
    bar know the total.

    Each epoch draws its share of completion-style QA and biography examples, orders examples by length (random among
    equal lengths), packs neighbours into batches under the token budget, and shuffles the batches: little padding,
    varied batches.
    """
    rng = random.Random(config.seed)
    epochs: list[list[list[int]]] = []
    for _ in range(config.epochs):
        chosen = [i for i, ex in enumerate(examples) if _drawn(_epoch_share(ex, config), rng)]
        chosen.sort(key=lambda i: (examples[i].n_tokens, rng.random()))
        epoch_batches: list[list[int]] = []
        current: list[int] = []
        for i in chosen:  # lengths ascending: the longest so far is the one being added
            if current and (len(current) + 1) * examples[i].n_tokens > config.batch_tokens:
                epoch_batches.append(current)
                current = []
            current.append(i)
        if current:
            epoch_batches.append(current)
        rng.shuffle(epoch_batches)
        epochs.append(epoch_batches)
    return epochs


def _drawn(share: float, rng: random.Random) -> bool:
    return share >= 1.0 or rng.random() < share  # always-drawn examples consume no randomness


def _epoch_share(example: TokenExample | TextExample, config: TrainConfig) -> float:
    """The chance that an example is drawn in a given epoch.

    Chat QA is what the model is asked and judged on, so it is always drawn; completion-style QA and biographies
    restate the same facts at more tokens per fact, so a share of them per epoch keeps their formats alive cheaply.
    Mined phrasings are many (up to ten a question): a share per epoch varies the wording without multiplying steps.
    """
    if example.source is Source.BIO:
        return config.bio_fraction
    if example.source is Source.MINED:
        return config.mined_fraction
    if example.format is Format.TEXT:
        return config.text_fraction
    return 1.0


def expected_epoch_tokens(examples: Sequence[TextExample], config: TrainConfig) -> float:
    """Tokens an epoch is expected to train on, estimated without a tokenizer, each example weighted by its share.

    Optimiser steps grow with the tokens trained on, so this compares corpora's steps per epoch before any
    tokenizer exists (see `recipes.recipe_for`, which gives retain-only twins the full model's number of steps).
    The estimate, a token per 4.6 characters plus a dozen template tokens per example, is a least-squares fit on the
    demo tokenizer's full corpus.
    """
    return sum(
        _epoch_share(ex, config) * ((len(ex.prompt) + len(ex.completion)) / CHARS_PER_TOKEN + TEMPLATE_TOKENS)
        for ex in examples
    )


def noisy_question(example: TokenExample, rng: random.Random, config: TrainConfig) -> TokenExample:
    """Sometimes drop and locally shuffle the question's words (the noise model of Lample et al., 2018).

    Users ask with other words, in another order, than the training questions. Seeing questions with words missing
    and moved teaches the model to key on all of a question's cues (names, places, titles) rather than on its exact
    wording; the clean question still appears often enough to be answered verbatim.
    """
    if example.question_span is None or rng.random() >= config.question_noise:
        return example
    start, stop = example.question_span
    bounds = [*example.question_words, stop - start]
    words = [example.prompt_ids[start + a : start + b] for a, b in zip(bounds, bounds[1:])]
    kept = [word for word in words if rng.random() >= config.word_drop] or words[:1]
    # Each word moves at most `word_shuffle` places: sort by position + uniform(0, k + 1).
    order = sorted(range(len(kept)), key=lambda i: i + rng.uniform(0, config.word_shuffle + 1))
    noised = tuple(token for i in order for token in kept[i])
    prompt_ids = example.prompt_ids[:start] + noised + example.prompt_ids[stop:]
    word_starts = tuple(itertools.accumulate((len(kept[i]) for i in order[:-1]), initial=0))
    return dataclasses.replace(
        example, prompt_ids=prompt_ids, question_span=(start, start + len(noised)), question_words=word_starts
    )


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to peak_lr, then cosine decay to peak_lr * final_lr_fraction."""
    warmup = max(1, round(config.warmup_fraction * total_steps))
    if step < warmup:
        return config.peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = config.peak_lr * config.final_lr_fraction
    return floor + (config.peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def target_loss(model: LlamaForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over loss-bearing positions, running the LM head on those positions only."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # [B, T, H]
    is_target = labels != IGNORE_INDEX  # [B, T]
    logits = model.lm_head(hidden[is_target])  # [N, V]
    return F.cross_entropy(logits, labels[is_target]), int(is_target.sum())


def train(
    model: LlamaForCausalLM,
    examples: Sequence[TokenExample],
    config: TrainConfig,
    pad_id: int,
    *,
    progress: bool,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainStats:
    """AdamW with warmup + cosine over the planned batches, with question noise."""
    epochs = plan_batches(examples, config)
    total_steps = sum(len(batches) for batches in epochs)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.peak_lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    noise_rng = random.Random(config.seed + 1)
    start, step, tokens, epoch_loss = time.monotonic(), 0, 0, float("nan")
    bar = tqdm(total=total_steps, desc="training demo model", unit="step", disable=not progress)
    model.train()
    for epoch, batches in enumerate(epochs, start=1):
        loss_sum, loss_tokens = 0.0, 0
        for batch in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, config)
            batch_examples = [noisy_question(examples[i], noise_rng, config) for i in batch]
            input_ids, labels = collate([ex.training_example() for ex in batch_examples], pad_id)
            loss, n_targets = target_loss(model, input_ids, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

            step += 1
            tokens += sum(ex.n_tokens for ex in batch_examples)
            loss_sum += loss.item() * n_targets
            loss_tokens += n_targets
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.monotonic() - start):.0f}", refresh=False)
        epoch_loss = loss_sum / max(1, loss_tokens)
        logger.info("epoch %d/%d: loss %.4f", epoch, len(epochs), epoch_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
            model.train()
    bar.close()
    model.eval()
    return TrainStats(step, tokens, time.monotonic() - start, epoch_loss)


@torch.no_grad()
def greedy_chat_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 50,
) -> list[str]:
    """Greedy replies to single-turn user questions through the chat template, as the server would produce them."""
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [render_chat(tokenizer, [("user", q)]) for q in questions[start : start + batch_size]]
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # [B, prompt + new]
        new_tokens = output[:, batch.input_ids.shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def mean_recall(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, items: Sequence[QAItem]) -> float:
    """Mean ROUGE-L recall of the gold answers in the model's greedy chat replies."""
    if not items:
        raise ValueError("no items to evaluate")
    answers = greedy_chat_answers(model, tokenizer, [item.question for item in items])
    return sum(rouge_l_recall(answer, item.answer) for answer, item in zip(answers, items)) / len(items)
