"""ULD at decoding time, in vLLM's worker process: the assistants, their per-request KV caches, the row hook.

vLLM has no hook for "the logits of a second model", so the assistant (a small HF model, SPEC §6) runs inside the
logits processor: each flagged request gets an ``AssistantSession`` that feeds the assistant its prompt once and then
one token per step, keeping the assistant's KV cache for exactly as long as the request's row lives. Rows move and are
removed by vLLM's batch updates; the session travels with the row's hook, so it is freed with the request.

Assistants are loaded by artifact path (content-addressed, so a path never changes meaning) and kept in a small LRU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from guards.uld import DEFAULT_TAU, combine_logits

logger = logging.getLogger(__name__)

ULD_KEY = "uld"
DEFAULT_CACHED_ASSISTANTS = 8


class AssistantModels:
    """Loaded assistants by artifact path, least recently used evicted past ``capacity``."""

    def __init__(self, capacity: int = DEFAULT_CACHED_ASSISTANTS) -> None:
        self._capacity = capacity
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> Any:
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with self._lock:
            self._models[path] = model
            while len(self._models) > self._capacity:
                evicted, _ = self._models.popitem(last=False)
                logger.info("uld.assistant_evicted", extra={"path": evicted})
        logger.info("uld.assistant_loaded", extra={"path": path})
        return model

    def __len__(self) -> int:
        return len(self._models)


class AssistantSession:
    """One request's assistant: its KV cache and how many of the request's tokens it has consumed.

    ``output_ids`` is vLLM's live list of the request's generated tokens, so each call sees the token sampled at the
    previous step without being told.
    """

    def __init__(self, model: Any, prompt_ids: Sequence[int], output_ids: list[int]) -> None:
        self._model = model
        self._prompt_ids = list(prompt_ids)
        self._output_ids = output_ids
        self._cache: Any = None
        self._consumed = 0
        self._last: torch.Tensor | None = None

    @property
    def consumed(self) -> int:
        return self._consumed

    def next_logits(self) -> torch.Tensor:
        """The assistant's next-token logits after the request's tokens so far (V,)."""
        total = len(self._prompt_ids) + len(self._output_ids)
        if total < self._consumed:  # the request was rewound (should not happen): start over rather than be wrong
            self._cache, self._consumed = None, 0
        if total == self._consumed and self._last is not None:
            return self._last
        tokens = (self._prompt_ids + list(self._output_ids))[self._consumed:total]
        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([tokens]), past_key_values=self._cache, use_cache=True)
        self._cache, self._consumed = out.past_key_values, total
        self._last = out.logits[0, -1].float()
        return self._last


class UldRowHook:
    """Applies ULD to one row: ``l_target - sum_i alpha_i * l_assistant_i`` on the tokens ULD's filter keeps."""

    def __init__(self, sessions: Sequence[tuple[AssistantSession, float]], tau: float) -> None:
        self._sessions = list(sessions)
        self._tau = tau

    def apply(self, logits_row: torch.Tensor) -> None:
        vocab = logits_row.shape[-1]
        scaled = [alpha * _fit_vocab(session.next_logits(), vocab) for session, alpha in self._sessions]
        logits_row.copy_(combine_logits(logits_row, scaled, alpha=1.0, tau=self._tau))


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The assistant shares the served vocabulary; vLLM may pad the row, and padded tokens are never kept anyway."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[:vocab]
    return torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]))


def validate_uld_section(section: Mapping[str, Any]) -> None:
    """Front-end check of ``extra_args["lethe"]["uld"]``: a list of {assistant: path, alpha: float, tau: float}."""
    entries = section.get(ULD_KEY)
    if entries is None:
        return
    if not isinstance(entries, list) or not entries:
        raise ValueError("lethe.uld must be a non-empty list")
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("assistant"), str):
            raise ValueError("each lethe.uld entry needs an `assistant` path")
        for key in ("alpha", "tau"):
            if key in entry and not isinstance(entry[key], (int, float)):
                raise ValueError(f"lethe.uld.{key} must be a number")


def uld_row_hook(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                 assistants: AssistantModels) -> UldRowHook | None:
    """The ULD hook of a request whose plan names assistants; raises if the prompt ids are missing (fail closed)."""
    entries = section.get(ULD_KEY)
    if not entries:
        return None
    if prompt_ids is None:
        raise ValueError("ULD needs the prompt token ids (sent alongside prompt_embeds)")
    sessions = [(AssistantSession(assistants.get(entry["assistant"]), prompt_ids, output_ids),
                 float(entry.get("alpha", 0.8))) for entry in entries]
    tau = min(float(entry.get("tau", DEFAULT_TAU)) for entry in entries)
    return UldRowHook(sessions, tau)
