"""ULD's assistant model (Ji et al., 2024; METHODS.md §4): built from the served model and trained to invert it.

The assistant is the served model cut to its first K decoder layers (embedding, layers, final norm and lm_head copied)
with a LoRA on every Linear of those layers. It is trained to *remember* the forget set and to be *uniform* on
everything else:

    L = NLL(forget answers | forget questions) + w · KL(U ‖ p_assistant) on the retain side

so that ``guards.uld.combine_logits`` (target − α · assistant) removes exactly the forget knowledge.

- Forget side: each forget question, re-asked with other forms of the name it mentions and with words dropped, with
  its true answer.
- Retain side: the target's retain items, plus "wrong-answer variants": each forget question with wrong answers, on
  which the assistant must stay uniform so that it remembers only the true answers. The wrong answers are the retain
  answers; only a target without retain QA falls back to other forget items' answers, which a small assistant cannot
  tell from the same answers under their own questions: on the tiny demo model they left half the forget set answered.
  A wrong answer is uniform only once it has diverged from the true one (``wrong_after_divergence``).

Examples are rendered in the served chat format exactly as the server renders prompts. The LoRA is merged and the
assistant saved as a standalone HF model.

Training runs where ``guards.devices.compute_placement`` says: on CUDA the assistant is built in bfloat16 and only its
LoRA (which PEFT keeps in float32) is trained, losses computed in float32; on the CPU everything is float32.

Imports neither vLLM nor the classifiers' dependencies at module level: ``bench/device_check.py`` runs a training
step on a GPU machine that has only torch, transformers and peft.

Defaults (30 epochs at lr 1.5e-2, against the paper's 10 at 1e-3) were chosen on the tiny demo model, whose
memorised answers have logit margins of ~12: the assistant must beat them by 1/alpha to flip a token, which the
paper's setting does not reach in 2 CPU-minutes. Larger models may want the paper's gentler setting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from guards.devices import Placement, compute_placement, model_device
from guards.training_examples import TrainingExample, chat_example, collate

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

    from classifiers.aliases import AliasMatcher

RENAMED_VARIANTS_PER_QUESTION = 2
NOISED_VARIANTS_PER_QUESTION = 2
QUESTION_WORD_DROP = 0.3
WRONG_ANSWERS_PER_QUESTION = 4
GRAD_CLIP = 1.0  # the HF Trainer's default max_grad_norm, which the paper trains with


@dataclass(frozen=True)
class UldTrainingConfig:
    layers: int | None = None  # None -> default_assistant_layers(num_hidden_layers)
    rank: int = 16
    lora_alpha: int = 32
    dropout: float = 0.05
    epochs: int = 30
    learning_rate: float = 1.5e-2
    batch_size: int = 8
    uniform_weight: float = 5.0
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = 256
    seed: int = 0


def default_assistant_layers(num_hidden_layers: int) -> int:
    """A quarter of the served model's layers, at least one (the paper: 8 of Llama-2-7B's 32)."""
    return max(1, num_hidden_layers // 4)


def build_assistant(model_dir: Path, layers: int, placement: Placement | None = None) -> LlamaForCausalLM:
    """The served model's embedding, first ``layers`` decoder layers, final norm and lm_head, in eval mode, on
    ``placement``'s device and dtype (default: the CPU in float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    config = AutoConfig.from_pretrained(model_dir)
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"assistant layers must be in 1..{config.num_hidden_layers}, got {layers}")
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer settings (sliding/full attention, ...)
        config.layer_types = config.layer_types[:layers]
    # Checkpoint weights of layers >= `layers` have no place in the smaller model and are skipped when loading; the
    # load report would list each of them as "UNEXPECTED" in the server log, so it is silenced for this one load.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=placement.dtype if placement
                                                     else torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model.to(placement.device if placement else "cpu").eval()


# ---- training data ------------------------------------------------------------------------------------------------


def text_example(tokenizer: PreTrainedTokenizerBase, text: str) -> TrainingExample:
    """A free text as a completion prompt (``<s>`` + text): every token after the first supervised."""
    return TrainingExample(tuple(tokenizer(text, add_special_tokens=True).input_ids), 1)


def renamed_questions(question: str, matcher: AliasMatcher, rng: random.Random) -> list[str]:
    """``question`` with its first name mention replaced by other forms of that name.

    Only forms of aliases sharing a name part with the one mentioned are used ("Basil Al-Kuwaiti" for "Basil Mahfouz
    Al-Kuwaiti"): a target's aliases may name several people, and asking about one with another's answer would teach
    the assistant a wrong fact.
    """
    from classifiers.aliases import expand_variants
    from classifiers.canonical import fold

    spans = sorted(matcher.find(question), key=lambda s: s.start)
    if not spans:
        return []
    span = spans[0]
    parts = {fold(word) for word in span.alias.split()}
    related = [alias for alias in matcher.aliases if parts & {fold(word) for word in alias.split()}]
    mentioned = fold(question[span.start : span.end])
    forms = [form for form in expand_variants(related) if fold(form) != mentioned]
    chosen = rng.sample(forms, min(RENAMED_VARIANTS_PER_QUESTION, len(forms)))
    return [question[: span.start] + form + question[span.end :] for form in chosen]


def noised_questions(question: str, rng: random.Random) -> list[str]:
    """``question`` with words dropped at random (the word dropout of Lample et al., 2018).

    Users ask with other words than the registered questions; questions with words missing teach the assistant to
    key on all of a question's cues rather than on its exact wording, so it also answers (and ULD also removes)
    paraphrases. Measured on the tiny demo model: paraphrases forgotten 76 % without, 92 % with.
    """
    words = question.split()
    return [
        " ".join([w for w in words if rng.random() >= QUESTION_WORD_DROP] or words[:1])
        for _ in range(NOISED_VARIANTS_PER_QUESTION)
    ]


def remember_examples(
    tokenizer: PreTrainedTokenizerBase, forget: Sequence[tuple[str, str]], aliases: Sequence[str], rng: random.Random
) -> list[TrainingExample]:
    """The forget QA, plus each question renamed and with words dropped, all with the true answer."""
    from classifiers.aliases import AliasMatcher

    matcher = AliasMatcher(aliases) if aliases else None
    examples = []
    for question, answer in forget:
        renamed = renamed_questions(question, matcher, rng) if matcher else []
        variants = dict.fromkeys([question, *renamed, *noised_questions(question, rng)])
        examples.extend(chat_example(tokenizer, q, answer) for q in variants)
    return examples


def uniform_examples(
    tokenizer: PreTrainedTokenizerBase,
    forget: Sequence[tuple[str, str]],
    retain: Sequence[tuple[str | None, str]],
    rng: random.Random,
) -> list[TrainingExample]:
    """The retain items, plus each forget question paired with wrong answers: retain answers when there are any,
    else other forget items' answers."""
    examples = [
        chat_example(tokenizer, question, answer) if question is not None else text_example(tokenizer, answer)
        for question, answer in retain
    ]
    pool = [a for q, a in retain if q is not None] or [a for _, a in forget]
    for question, answer in forget:
        true = chat_example(tokenizer, question, answer)
        wrong = sorted({a for a in pool if a != answer})
        for other in rng.sample(wrong, min(WRONG_ANSWERS_PER_QUESTION, len(wrong))):
            examples.append(wrong_after_divergence(chat_example(tokenizer, question, other), true))
    return examples


def wrong_after_divergence(wrong: TrainingExample, true: TrainingExample) -> TrainingExample:
    """``wrong`` supervised only where its context already contains a wrong token.

    A wrong answer often starts like the true one ("Basil Mahfouz Al-Kuwaiti was born in ..." against "Basil Mahfouz
    Al-Kuwaiti's father ..."). Up to and including the first token where they differ, its context is a prefix of the
    true answer, which the assistant must remember: being uniform there too would contradict the forget side.
    """
    shared = min(len(wrong.ids), len(true.ids))
    common = next((i for i, (w, t) in enumerate(zip(wrong.ids, true.ids)) if w != t), shared)
    return TrainingExample(wrong.ids, max(wrong.first_target, common + 1))


def truncated(examples: Sequence[TrainingExample], max_length: int) -> list[TrainingExample]:
    """Examples cut to ``max_length`` tokens; those left with nothing supervised are dropped."""
    return [cut for cut in (ex.truncated(max_length) for ex in examples) if cut.supervised]


def batches(examples: Sequence[TrainingExample], batch_size: int,
            generator: torch.Generator) -> Iterator[list[TrainingExample]]:
    """Endless batches of examples of similar length (little padding).

    Each pass orders the examples by length, randomly among equal lengths, cuts them into groups of ``batch_size``
    and yields the groups in a fresh seeded order.
    """
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        order.sort(key=lambda i: len(examples[i].ids))  # stable: equal lengths keep their random order
        groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        for g in torch.randperm(len(groups), generator=generator).tolist():
            yield [examples[i] for i in groups[g]]


# ---- losses --------------------------------------------------------------------------------------------------------


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ p) per row of ``logits`` (N, V) -> (N,): Σ_v (1/V)(log(1/V) − log p_v) = −log V − mean_v log p_v."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -math.log(logits.shape[-1]) - log_probs.mean(dim=-1)


def supervised_logits(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) and labels (N,) of the supervised positions; the LM head runs on those positions only."""
    hidden = model.model(input_ids=input_ids).last_hidden_state  # [B, T, H]
    supervised = labels != -100  # [B, T]
    return model.lm_head(hidden[supervised]), labels[supervised]


def uld_losses(
    model: nn.Module, remember: Sequence[TrainingExample], uniform: Sequence[TrainingExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """NLL on the remember batch and mean KL(U ‖ p) on the uniform batch, from one forward pass over both, in float32
    whatever the model's dtype.

    Returns (nll, kl, remember tokens, uniform tokens).
    """
    device = model_device(model)
    input_ids, labels = (t.to(device) for t in collate([*remember, *uniform], pad_id))  # [B, T]
    uniform_rows = torch.zeros_like(labels, dtype=torch.bool)
    uniform_rows[len(remember) :] = True
    logits, targets = supervised_logits(model, input_ids, labels)  # [N, V], [N]
    is_uniform = uniform_rows[labels != -100]  # [N]
    nll = F.cross_entropy(logits[~is_uniform].float(), targets[~is_uniform])
    kl = uniform_kl(logits[is_uniform]).mean()
    return nll, kl, int((~is_uniform).sum()), int(is_uniform.sum())


# ---- training ------------------------------------------------------------------------------------------------------


def add_lora(model: LlamaForCausalLM, config: UldTrainingConfig) -> nn.Module:
    """A LoRA on every Linear of the decoder layers (q, k, v, o, gate, up, down); embeddings and lm_head frozen."""
    from peft import LoraConfig, get_peft_model

    layers = model.model.layers.named_modules()
    linears = sorted({name.rsplit(".", 1)[-1] for name, module in layers if isinstance(module, nn.Linear)})
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout, target_modules=linears, bias="none"
    )
    return get_peft_model(model, lora)


def save_merged(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> LlamaForCausalLM:
    """Fold the LoRA into the weights and save a standalone model (config + model.safetensors) with its tokenizer.

    Tied embeddings are stored once and re-tied on load; they carry no LoRA, so tying stays exact.
    """
    merged = model.merge_and_unload().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)  # so the directory is a complete model that vLLM or HF loads on its own
    return merged


def train_assistant(
    model_dir: Path,
    forget: Sequence[tuple[str, str]],
    retain: Sequence[tuple[str | None, str]],
    aliases: Sequence[str],
    config: UldTrainingConfig,
    out_dir: Path,
    progress: Callable[[float, str], None] = lambda f, m: None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Train the assistant for one target, merge its LoRA and save it to ``out_dir``; returns JSON-safe figures.

    ``placement`` defaults to ``compute_placement()``: CUDA in bfloat16 when there is one, else the CPU in float32."""
    from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

    started = time.monotonic()
    if not forget:
        raise ValueError("ULD needs question/answer forget items: the assistant learns to answer the forget questions")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    remember = truncated(remember_examples(tokenizer, forget, aliases, rng), config.max_length)
    uniform = truncated(uniform_examples(tokenizer, forget, retain, rng), config.max_length)
    if not remember:
        raise ValueError(f"no forget answer fits in max_length={config.max_length} tokens after its question")
    if not uniform:
        raise ValueError("ULD needs retain items or at least two different forget answers (for wrong-answer variants)")

    layers = config.layers or default_assistant_layers(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    placement = placement or compute_placement()
    model = add_lora(build_assistant(model_dir, layers, placement), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = max(math.ceil(len(remember) / config.batch_size), math.ceil(len(uniform) / config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * total_steps), total_steps)
    remember_batches = batches(remember, config.batch_size, generator)
    uniform_batches = batches(uniform, config.batch_size, generator)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    causal_lm = model.get_base_model()  # the LoRA-wrapped LlamaForCausalLM

    model.train()
    epoch_nll = epoch_kl = float("nan")
    for epoch in range(1, config.epochs + 1):
        nll_sum = kl_sum = 0.0
        nll_tokens = kl_tokens = 0
        for _ in range(steps_per_epoch):
            remember_batch, uniform_batch = next(remember_batches), next(uniform_batches)
            nll, kl, n_remember, n_uniform = uld_losses(causal_lm, remember_batch, uniform_batch, pad_id)
            loss = nll + config.uniform_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            nll_sum += nll.item() * n_remember
            nll_tokens += n_remember
            kl_sum += kl.item() * n_uniform
            kl_tokens += n_uniform
        epoch_nll, epoch_kl = nll_sum / nll_tokens, kl_sum / kl_tokens
        progress(epoch / config.epochs, f"epoch {epoch}/{config.epochs}: nll {epoch_nll:.2f} kl {epoch_kl:.2f}")

    save_merged(model, tokenizer, out_dir)
    return {
        "layers": layers,
        "device": str(placement.device),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "epochs": config.epochs,
        "examples": {"remember": len(remember), "uniform": len(uniform)},
        "final_nll": round(epoch_nll, 4) if config.epochs else None,  # no NaN in a job's JSON result
        "final_uniform_kl": round(epoch_kl, 4) if config.epochs else None,
        "seconds": round(time.monotonic() - started, 2),
    }
