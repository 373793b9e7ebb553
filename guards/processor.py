"""The one vLLM logits processor Lethe registers: ``guards.processor:LetheLogitsProcessor``.

vLLM fixes its logits processors at engine start and runs them every decoding step over the whole batch, in the
engine's worker process. Lethe therefore registers exactly one class and drives it per request through
``SamplingParams.extra_args["lethe"]``: a request without that key is never touched, and a step in which no row carries
it returns at once, so unflagged traffic pays nothing but a dict lookup.

Each mechanism that acts at decoding time brings its ``RowHooks`` (``guards/base.py``); the processor keeps one list of
hooks per batch row and applies them in the mechanisms' composition order (``guards/mechanisms.py``): GUARD's bans
first, then ULD's difference over the tokens still allowed.

This is vLLM's V1 logits-processor interface. vLLM 0.33's Model Runner V2 (the CUDA default) refuses V1-interface
processors, so the engine runs the V1 model runner on GPU (``server/engine.py``; docs/mechanisms.md, "On a GPU").
The processor is registered explicitly (``AsyncEngineArgs.logits_processors``), never through an entry point: with
async scheduling vLLM repairs the ``-1`` placeholders in the rows' output-token lists only for explicitly registered
processors, and ULD's assistant and GUARD's phrase matcher read those lists.

Nothing a request carries may take the engine down: a hook that cannot be built or fails while applying is replaced
by ``FailClosedHook``, which ends that request's reply at once (an exception here would kill vLLM's EngineCore and
every request in it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from guards.base import RowHook
from guards.devices import placement_for
from guards.row_groups import hooks_by_class
from guards.row_hooks import EXTRA_ARGS_KEY, ROW_HOOKS, RowHookError, build_row_hooks, row_hook_resources

logger = logging.getLogger(__name__)


class FailClosedHook:
    """Forces the end-of-sequence token: a mechanism that cannot run must not let the request through unguarded."""

    def __init__(self, eos_token_id: int) -> None:
        self._eos = eos_token_id

    def apply(self, logits_row: torch.Tensor) -> None:
        keep = logits_row[self._eos].clone()
        logits_row.fill_(float("-inf"))
        # torch.where, not `if isfinite`: no device-to-host sync inside the sampler on a GPU
        logits_row[self._eos] = torch.where(torch.isfinite(keep), keep, torch.zeros_like(keep))


def lethe_args(params: SamplingParams) -> Mapping[str, Any] | None:
    """The Lethe section of a request's extra_args, or None for an unflagged request."""
    extra = params.extra_args or {}
    section = extra.get(EXTRA_ARGS_KEY)
    return section if isinstance(section, Mapping) else None


class LetheLogitsProcessor(LogitsProcessor):
    """Applies every active mechanism's row hooks to the rows of flagged requests."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, list[RowHook]] = {}
        tokenizer = _served_tokenizer(vllm_config) if vllm_config is not None else None
        self.eos_token_id = int(tokenizer.eos_token_id or 0) if tokenizer is not None else 0
        # The hooks' tensors (ULD's assistants) live with the logits: vLLM's device, the served model's dtype.
        dtype = vllm_config.model_config.dtype if vllm_config is not None else None
        self.placement = placement_for(device, dtype)
        self.resources = row_hook_resources(tokenizer, self.placement, in_engine=True, row_hooks=ROW_HOOKS)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the front end: a malformed section becomes an HTTP 400 instead of an engine crash."""
        section = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if section is not None and not isinstance(section, Mapping):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a mapping")
        if section is not None:
            for _, row_hooks in ROW_HOOKS:
                row_hooks.validate(section)

    def warm(self, mechanism: str, request: Mapping[str, Any]) -> list[str]:
        """Load a mechanism's artifacts ahead of its requests, in the background (the front end's ``collective_rpc``
        through ``guards.engine_extension``); returns those loaded now. Returns at once: it runs between steps."""
        for name, row_hooks in ROW_HOOKS:
            if name == mechanism and row_hooks.warm is not None:
                return list(row_hooks.warm(self.resources[name], request))
        return []

    def is_argmax_invariant(self) -> bool:
        # Mechanisms change which token wins, so the processor must also run for greedy batches.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._hooks_for_request)

    def _hooks_for_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> list[RowHook] | None:
        section = lethe_args(params)
        if section is None:
            return None
        try:
            return build_row_hooks(section, prompt_ids, output_ids, self.resources, row_hooks=ROW_HOOKS) or None
        except RowHookError as exc:
            logger.exception("processor.hook_failed", extra={"mechanism": exc.mechanism, "phase": "add"})
            return [FailClosedHook(self.eos_token_id)]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Every row's hooks in its composition order, position by position: at each position the hooks of a class
        that can (``apply_rows``: GUARD's one ``index_put_``, ULD's one combination) are applied to all their rows at
        once. Rows are independent, so this keeps each row's order. A batched call that fails leaves its rows to
        their own ``apply``; a row whose hook fails there is ended (``FailClosedHook``) and gets no further hooks."""
        if not self.rows:
            return logits
        self._prepare_rows()
        ended: set[int] = set()
        for position in range(max(len(hooks) for hooks in self.rows.values())):
            batched: dict[type, list[tuple[int, RowHook]]] = {}
            for row, hooks in self.rows.items():
                if position >= len(hooks) or row in ended:
                    continue
                if hasattr(type(hooks[position]), "apply_rows"):
                    batched.setdefault(type(hooks[position]), []).append((row, hooks[position]))
                elif not self._apply_one(logits, row, hooks[position]):
                    ended.add(row)
            for hook_class, rows in batched.items():
                try:
                    hook_class.apply_rows(logits, rows)
                except Exception:
                    logger.exception("processor.apply_rows_failed", extra={"hook": hook_class.__name__})
                    ended.update(row for row, hook in rows if not self._apply_one(logits, row, hook))
        return logits

    def _apply_one(self, logits: torch.Tensor, row: int, hook: RowHook) -> bool:
        """``hook`` on its row; if it fails, the row is ended (False)."""
        try:
            hook.apply(logits[row])
            return True
        except Exception:
            logger.exception("processor.hook_failed", extra={"row": row, "phase": "apply"})
            failed = FailClosedHook(self.eos_token_id)
            self.rows[row] = [failed]
            failed.apply(logits[row])
            return False

    def _prepare_rows(self) -> None:
        """Each hook class's batched work for all its rows (see ``RowHook``); a failure leaves it to the rows."""
        for hook_class, hooks in hooks_by_class((hook for hooks in self.rows.values() for hook in hooks),
                                                "prepare_rows").items():
            try:
                hook_class.prepare_rows(hooks)
            except Exception:
                logger.exception("processor.prepare_rows_failed", extra={"hook": hook_class.__name__})


def _served_tokenizer(vllm_config: VllmConfig) -> Any:
    """The served model's tokenizer, loaded once per engine worker for the mechanisms' per-process state."""
    from transformers import AutoTokenizer

    config = vllm_config.model_config
    return AutoTokenizer.from_pretrained(config.tokenizer, trust_remote_code=config.trust_remote_code)
