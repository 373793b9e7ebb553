"""The served model on a job's own HF copy, with a mechanism's decoding-time hooks applied: what calibration measures.

A calibration job (``guards.never_seen``) asks two things of the protected model, many times over while it searches
a mechanism's strength: how likely a fixed answer is after a question (teacher forcing, the statistic TOFU's truth
ratio and a reader of logprobs see) and what the model says (greedy decoding, what a client sees). Both must apply
the mechanism exactly as the engine's logits processor does, so the hooks are the engine's own row hooks
(``guards.row_hooks`` or a mechanism's hook class), fed the tokens one by one through the same live ``output_ids``
list the engine grows. The served model's logits are computed once per (prompt, answer) and reused for every
strength tried: only the hooks change between tries.

Runs where ``guards.devices.compute_placement`` says (a worker's GPU in bfloat16 when there is one); the hooks see
float32 rows, as the scorer's do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from guards.chat import chat_prompt_ids
from guards.devices import Placement, compute_placement
from guards.row_groups import hooks_by_class

HookFactory = Callable[[Sequence[int], list[int]], Sequence[Any]]
"""``(prompt_ids, output_ids) -> row hooks`` for one sequence; ``output_ids`` is the live list of tokens so far."""

GREEDY_BATCH = 32  # rows decoded together: a calibration's 20 questions in one batch, bounded for larger models
LOGPROB_FLOOR = -100.0  # a banned token (-inf) scores as e^-100: finite for means and truth ratios


def no_hooks(prompt_ids: Sequence[int], output_ids: list[int]) -> Sequence[Any]:
    return ()


def stacked(*factories: HookFactory) -> HookFactory:
    """Several mechanisms' hooks on one sequence, applied in the order given: the engine's order
    (``guards.row_hooks``: GUARD's bans, then ULD's difference), so a combination is measured as it serves."""

    def factory(prompt_ids: Sequence[int], output_ids: list[int]) -> list[Any]:
        return [hook for each in factories for hook in each(prompt_ids, output_ids)]

    return factory


def hooked_logprobs(rows: torch.Tensor, answer: Sequence[int], hooks: Sequence[Any], output: list[int]) -> list[float]:
    """Per-token log-probabilities of ``answer`` from its teacher-forced logits ``rows`` (A, V), each row passed
    through ``hooks`` after the tokens before it were appended to ``output`` (the hooks' live list); edits ``rows``."""
    for hook in hooks:  # the whole answer is known: a hook that can read it at once does (ULD's assistant pass)
        if hasattr(hook, "expect"):
            hook.expect(answer)
    for position, token in enumerate(answer):
        for hook in hooks:
            hook.apply(rows[position])
        output.append(token)
    targets = torch.tensor(list(answer), device=rows.device).unsqueeze(1)  # (A, 1)
    logprobs = torch.log_softmax(rows, dim=-1).gather(1, targets).squeeze(1)  # (A,)
    return logprobs.clamp_min(LOGPROB_FLOOR).tolist()


class ModelProbe:
    """An HF copy of the served model that scores answers and decodes greedily under a given set of row hooks."""

    def __init__(self, model_dir: Path, placement: Placement | None = None,
                 checkpoint: Callable[[], None] = lambda: None) -> None:
        """``checkpoint`` runs before every forward pass: a job passes ``check_cancelled``, so that a calibration
        (hundreds of passes between two progress reports) stops within one pass of its target's deletion."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._checkpoint = checkpoint
        self.placement = placement or compute_placement()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.placement.dtype)
        self.model = model.to(self.placement.device).eval()
        self._rows: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def prompt_ids(self, question: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, question)

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tokenizer.encode(answer, add_special_tokens=False))

    def mean_loss(self, question: str, answer: str, hooks: HookFactory = no_hooks) -> float:
        """Length-normalised NLL of ``answer`` after ``question`` (TOFU's per-answer loss), hooks applied."""
        prompt, tokens = self.prompt_ids(question), self.answer_ids(answer)
        if not tokens:
            raise ValueError("an answer needs at least one token")
        with torch.inference_mode():
            rows = self._answer_rows(prompt, tokens).clone()  # the hooks edit rows in place
            output: list[int] = []
            logprobs = hooked_logprobs(rows, tokens, list(hooks(prompt, output)), output)
        return -sum(logprobs) / len(logprobs)

    def greedy(self, question: str, max_tokens: int, hooks: HookFactory = no_hooks) -> str:
        """The greedy reply to ``question`` with the hooks editing each step's logits (stops at end of sequence)."""
        return self.greedy_many([question], max_tokens, [hooks])[0]

    def greedy_many(self, questions: Sequence[str], max_tokens: int,
                    hooks: Sequence[HookFactory] | None = None) -> list[str]:
        """The greedy replies to ``questions``, question ``i`` under ``hooks[i]`` (default: none), decoded
        ``GREEDY_BATCH`` at a time: a calibration decodes a score of replies at every strength it tries, and one at a
        time that was most of its time (58 of ULD's 66 s on the tiny demo model: one forward pass per token each)."""
        factories = list(hooks) if hooks is not None else [no_hooks] * len(questions)
        if len(factories) != len(questions):
            raise ValueError("one hook factory per question")
        replies: list[str] = []
        for start in range(0, len(questions), GREEDY_BATCH):
            chunk = slice(start, start + GREEDY_BATCH)
            replies += self._greedy_batch([self.prompt_ids(q) for q in questions[chunk]], max_tokens, factories[chunk])
        return replies

    def _greedy_batch(self, prompts: list[list[int]], max_tokens: int, factories: list[HookFactory]) -> list[str]:
        """One padded batch decoded in step. Prompts are left-padded (masked, positions counted from each prompt's
        first token) so that every row's next token is in the last column. At each step the hooks act as in the
        engine's processor: each hook class's batched preparation over the unfinished rows (``prepare_rows``: ULD's
        assistant step for all of them at once), then every row's hooks in order on its own logits."""
        device = self.placement.device
        eos = self.tokenizer.eos_token_id
        width = max(len(prompt) for prompt in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        outputs: list[list[int]] = [[] for _ in prompts]
        live = [list(factory(prompt, output)) for factory, prompt, output in zip(factories, prompts, outputs,
                                                                                    strict=True)]
        unfinished = list(range(len(prompts)))
        with torch.inference_mode():
            self._checkpoint()
            step = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            for generated in range(max_tokens):
                rows = step.logits[:, -1].float()
                for hook_class, members in hooks_by_class((h for i in unfinished for h in live[i]),
                                                          "prepare_rows").items():
                    hook_class.prepare_rows(members)
                for i in unfinished:
                    for hook in live[i]:
                        hook.apply(rows[i])
                tokens = rows.argmax(dim=-1).tolist()
                for i in list(unfinished):
                    if tokens[i] == eos:
                        unfinished.remove(i)
                    else:
                        outputs[i].append(tokens[i])
                if not unfinished or generated == max_tokens - 1:
                    break
                self._checkpoint()
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], 1)
                positions = positions[:, -1:] + 1
                step = self.model(input_ids=torch.tensor(tokens, device=device).unsqueeze(1), attention_mask=mask,
                                  position_ids=positions, past_key_values=step.past_key_values, use_cache=True)
        return [self.tokenizer.decode(output, skip_special_tokens=True) for output in outputs]

    def _answer_rows(self, prompt: list[int], answer: list[int]) -> torch.Tensor:
        """The plain model's float32 logits predicting each answer token (cached: calibration asks again and again)."""
        key = (tuple(prompt), tuple(answer))
        if key not in self._rows:
            self._checkpoint()
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prompt + answer], device=self.placement.device))
            start = len(prompt) - 1
            self._rows[key] = out.logits[0, start:start + len(answer)].float()
        return self._rows[key]
