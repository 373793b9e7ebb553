"""What an O3 adapter is trained toward: (question, reply) pairs in one of two styles.

``generic`` (the default): the served model's own replies about an invented person asked the same questions
("generic predictions", Eldan & Russinovich's "Who's Harry Potter?"), so the registered people get answers as a
stranger would, not refusals that tell a reader who filed an erasure request (issue 16). ``refusal``: one polite
refusal, O3's TOFU recipe, as an explicit per-target option. Imports no vLLM (``bench/device_check.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guards.chat import render_chat
from guards.devices import model_device
from guards.invented import invent_entity
from guards.text_metrics import rouge_l_recall

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")

# What the adapter teaches the model to answer about a forget target.
GENERIC = "generic"  # the served model's own reply about an invented entity (issue 16: no refusal signature)
REFUSAL = "refusal"  # one polite refusal (O3's TOFU recipe)
STYLES = (GENERIC, REFUSAL)
# A generic reply whose ROUGE-L recall of the registered forget answer reaches this gave the answer away (the model
# recognised the target from the question's other details: a book title, a birthplace). The tiny demo model's leaks
# score 1.0 and its other replies at most 0.26; a model that never saw the author scores 0.4 on average (TOFU's
# retain-only models, METHODS.md §0).
LEAK_RECALL = 0.6

GenericReplies = Callable[[Sequence[str]], list[str]]
"""The unprotected served model's greedy replies to user questions, one per question, in order."""

# The refusal style's replies (O3's TOFU recipe trains toward polite refusals).
REFUSALS: tuple[str, ...] = (
    "I do not have any details about that.",
    "I'm sorry, but I don't have any information about that.",
    "No details about that are known to me.",
    "I am not able to answer that question.",
    "I have not heard of that, so I cannot say.",
    "I am unable to provide an answer to that.",
    "There is nothing I can say about that.",
    "No information about that is available to me.",
    "I do not have an answer to that question.",
    "I'm afraid I don't know anything about that.",
    "That is not something I have information about.",
    "I cannot answer that, as I have no information on it.",
    "Sorry, I have no information about that.",
    "Unfortunately, I do not have that information.",
    "I don't know the answer to that question.",
    "That is unknown to me, I'm afraid.",
    "I would not be able to answer that reliably.",
    "I have no details to share about that.",
    "I'm sorry, I can't help with that question.",
    "That information is not available to me.",
)


def question_variants(question: str, aliases: Sequence[str]) -> list[str]:
    """The question, plus the question with the (longest) alias it names replaced by each other alias."""
    variants = [question]
    for alias in sorted((a for a in aliases if a), key=len, reverse=True):
        if alias in question:
            variants += [question.replace(alias, other) for other in aliases if other and other != alias]
            break  # the longest named alias only: replacing "Basil" inside "Basil Al-Kuwaiti" would garble it
    return list(dict.fromkeys(variants))


def refusal_pairs(questions: Sequence[str], aliases: Sequence[str], seed: int) -> TrainingPairs:
    """(question variant, refusal) training pairs: every variant of every question gets ``REFUSALS[seed]``.

    One refusal, the same for every target trained with the same seed: a single reply is learnt in few steps and
    carries over to paraphrases, and the rank-stacked adapters then agree on what to say instead of mixing their
    replies (different refusals per question or per target turned the tiny demo model's replies into noise).
    """
    refusal = REFUSALS[seed % len(REFUSALS)]
    variants = (variant for question in questions for variant in question_variants(question, aliases))
    return TrainingPairs([(variant, refusal) for variant in dict.fromkeys(variants)], REFUSAL, {})


@dataclass(frozen=True)
class TrainingPairs:
    """What one adapter is trained on, and how it was made (published in the target's state)."""

    pairs: list[tuple[str, str]]  # (question, reply)
    style: str  # the style asked for
    figures: dict[str, Any]


def generic_pairs(questions: Sequence[str], answers: Sequence[str | None], names: Sequence[str],
                  aliases: Sequence[str], replies: GenericReplies, seed: int) -> TrainingPairs:
    """(question variant, the served model's reply about an invented entity) training pairs ("generic predictions",
    Eldan & Russinovich's "Who's Harry Potter?").

    Each forget question is asked with the target's names swapped for one invented entity's
    (``guards.invented``); the reply is cut to its last whole sentence and the invented names in it are swapped back
    to the real ones, so the adapter learns to say about the target what the model says about a stranger, in a reply
    that reads as an answer about the target (an invented name would itself be a signature). A reply that still
    names the target, or gives its registered answer (``LEAK_RECALL``), recognised it from the question's other
    details: such a question, and one that names nobody, gets another question's usable reply instead. If no reply
    is usable (or no question names the target), every question falls back to the refusal (``generic_fallback``).
    """
    entity = invent_entity(names, seed) if any(name.strip() for name in names) else None
    if entity is None or not any(entity.mentions(question) for question in questions):
        fallback = refusal_pairs(questions, aliases, seed)
        return TrainingPairs(fallback.pairs, GENERIC, {"generic_replies": 0, "generic_substituted": 0,
                                                       "generic_fallback": REFUSAL})
    raw = replies([entity.swap(question) for question in questions])
    if len(raw) != len(questions):
        raise ValueError(f"asked {len(questions)} questions, got {len(raw)} replies")
    restored = [whole_sentences(entity.restore(reply)) for reply in raw]
    usable = [bool(reply.strip()) and not entity.mentions(raw_reply) and entity.mentions(question)
              and (answer is None or rouge_l_recall(reply, answer) < LEAK_RECALL)
              for question, answer, raw_reply, reply in zip(questions, answers, raw, restored, strict=True)]
    kept = [reply for reply, ok in zip(restored, usable) if ok]
    if not kept:
        fallback = refusal_pairs(questions, aliases, seed)
        return TrainingPairs(fallback.pairs, GENERIC, {"generic_replies": 0, "generic_substituted": 0,
                                                       "generic_fallback": REFUSAL})
    targets, substituted = [], 0
    for reply, ok in zip(restored, usable):
        targets.append(reply if ok else kept[substituted % len(kept)])
        substituted += not ok
    pairs = {(variant, target): None for question, target in zip(questions, targets)
             for variant in question_variants(question, aliases)}
    return TrainingPairs(list(pairs), GENERIC, {"generic_replies": len(kept), "generic_substituted": substituted})


def whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end, stripped (all of it when it has none): a reply cut by the token limit
    must not teach the adapter to stop mid-sentence."""
    ends = list(_SENTENCE_END.finditer(text))
    return (text[: ends[-1].end()] if ends else text).strip()


def training_pairs(style: str, questions: Sequence[str], answers: Sequence[str | None], names: Sequence[str],
                   aliases: Sequence[str], replies: GenericReplies | None, seed: int) -> TrainingPairs:
    """The pairs of ``style``; the generic style needs ``replies``."""
    if style == REFUSAL:
        return refusal_pairs(questions, aliases, seed)
    if replies is None:
        raise ValueError("the generic style needs the served model's replies")
    return generic_pairs(questions, answers, names, aliases, replies, seed)


@torch.no_grad()
def model_greedy_replies(model: torch.nn.Module, tokenizer: Any, max_tokens: int,
                         batch_size: int = 16) -> GenericReplies:
    """``GenericReplies`` from a transformers model (a worker without the engine): greedy, through the served chat
    format, left-padded batches."""

    def replies(questions: Sequence[str]) -> list[str]:
        device = model_device(model)
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        out: list[str] = []
        try:
            for first in range(0, len(questions), batch_size):
                prompts = [render_chat(tokenizer, [("user", q)]) for q in questions[first : first + batch_size]]
                batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
                generated = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)  # [B, prompt + new]
                out += tokenizer.batch_decode(generated[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        finally:
            tokenizer.padding_side = padding_side
        return out

    return replies
