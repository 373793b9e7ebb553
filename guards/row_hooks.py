"""The decoding-time mechanisms' row hooks, gathered: shared by the engine's logits processor (``guards/processor.py``)
and the scoring path (``server/guarded_scorer.py``), so an answer is scored under exactly the restrictions a reply
would be generated under.

Imports no vLLM: the scoring path runs where vLLM is not installed (``bench/device_check.py``'s GPU machine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from guards.base import RowHook, RowHooks
from guards.devices import Placement
from guards.mechanisms import MECHANISMS

EXTRA_ARGS_KEY = "lethe"
"""The key of Lethe's section in a request's ``SamplingParams.extra_args``."""

ROW_HOOKS: list[tuple[str, RowHooks]] = [(m.name, m.row_hooks) for m in MECHANISMS if m.row_hooks is not None]
"""(mechanism name, its decoding-time half), in composition order."""


class RowHookError(RuntimeError):
    """A mechanism's row hook could not be built; ``mechanism`` names it."""

    def __init__(self, mechanism: str) -> None:
        super().__init__(f"the {mechanism} row hook could not be built")
        self.mechanism = mechanism


def row_hook_resources(tokenizer: Any, placement: Placement, in_engine: bool = False,
                       row_hooks: Sequence[tuple[str, RowHooks]] | None = None) -> dict[str, Any]:
    """Each decoding-time mechanism's per-process state (``tokenizer`` is None outside an engine), for logits on
    ``placement``; ``in_engine``: for the engine's processor, where a hook build must never wait
    (``RowHooks.engine_resources``). ``row_hooks`` defaults to ``ROW_HOOKS``."""
    hooks_by_name = ROW_HOOKS if row_hooks is None else row_hooks
    return {name: (hooks.engine_resources if in_engine and hooks.engine_resources is not None else hooks.resources)(
        tokenizer, placement) for name, hooks in hooks_by_name}


def build_row_hooks(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                    resources: Mapping[str, Any],
                    row_hooks: Sequence[tuple[str, RowHooks]] | None = None) -> list[RowHook]:
    """Every decoding-time mechanism's hook for one request, in composition order (``row_hooks``, default
    ``ROW_HOOKS``). ``resources`` is ``row_hook_resources``'s result."""
    hooks: list[RowHook] = []
    for name, mechanism_hooks in ROW_HOOKS if row_hooks is None else row_hooks:
        try:
            hook = mechanism_hooks.build(section, prompt_ids, output_ids, resources.get(name))
        except Exception as exc:
            raise RowHookError(name) from exc
        if hook is not None:
            hooks.append(hook)
    return hooks
