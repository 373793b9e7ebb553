"""The one vLLM logits processor Lethe registers: ``guards.processor:LetheLogitsProcessor``.

vLLM fixes its logits processors at engine start and runs them every decoding step over the whole batch, in the
engine's worker process. Lethe therefore registers exactly one class and drives it per request through
``SamplingParams.extra_args["lethe"]``: a request without that key is never touched, and a step in which no row carries
it returns at once, so unflagged traffic pays nothing but a dict lookup.

Each guard that acts at decoding time contributes a ``RowHook`` factory (``ROW_HOOK_FACTORIES``); the processor keeps
one list of hooks per batch row and applies them in that list's order, which is the documented composition order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from guards.phrase_matcher import Vocabulary, guard_row_hook, validate_guard_section

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "lethe"


class RowHook(Protocol):
    """Per-request decoding-time state of one guard; ``apply`` edits one row of logits in place."""

    def apply(self, logits_row: torch.Tensor) -> None: ...


RowHookFactory = Callable[[Mapping[str, Any], Sequence[int] | None, list[int], Vocabulary | None], RowHook | None]
"""(the request's ``extra_args["lethe"]``, prompt token ids, live output token ids, the served vocabulary's text)
-> hook, or None if not needed."""

ROW_HOOK_FACTORIES: list[tuple[str, RowHookFactory]] = [("guard", guard_row_hook)]


def lethe_args(params: SamplingParams) -> Mapping[str, Any] | None:
    """The Lethe section of a request's extra_args, or None for an unflagged request."""
    extra = params.extra_args or {}
    section = extra.get(EXTRA_ARGS_KEY)
    return section if isinstance(section, Mapping) else None


class LetheLogitsProcessor(LogitsProcessor):
    """Applies every active guard's row hooks to the rows of flagged requests."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, list[RowHook]] = {}
        self.vocabulary = _served_vocabulary(vllm_config) if vllm_config is not None else None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the front end: a malformed section becomes an HTTP 400 instead of an engine crash."""
        section = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if section is not None and not isinstance(section, Mapping):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a mapping")
        if section is not None:
            validate_guard_section(section)

    def is_argmax_invariant(self) -> bool:
        # Guards change which token wins, so the processor must also run for greedy batches.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._hooks_for_request)

    def _hooks_for_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> list[RowHook] | None:
        section = lethe_args(params)
        if section is None:
            return None
        hooks = [hook for _, factory in ROW_HOOK_FACTORIES
                 if (hook := factory(section, prompt_ids, output_ids, self.vocabulary))]
        return hooks or None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        for row, hooks in self.rows.items():
            for hook in hooks:
                hook.apply(logits[row])
        return logits


def _served_vocabulary(vllm_config: VllmConfig) -> Vocabulary:
    """The text of every token of the served model, read once per worker from its tokenizer."""
    from transformers import AutoTokenizer

    config = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, trust_remote_code=config.trust_remote_code)
    return Vocabulary.from_tokenizer(tokenizer)
