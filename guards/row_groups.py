"""Row hooks grouped by class, for the batched work a hook class can do for all its rows at once.

Shared by the engine's logits processor (``guards/processor.py``) and calibration's batched greedy decoding
(``guards/probe.py``), so both prepare rows the same way. Imports nothing but the standard library: the probe runs
where only torch, transformers and peft are installed (``bench/device_check.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def hooks_by_class(hooks: Iterable[Any], method: str) -> dict[type, list[Any]]:
    """The hooks whose class defines the static ``method`` (``prepare_rows``: see ``guards.base.RowHook``), grouped
    by class in first-seen order, so that each class's batched work runs once over all its rows."""
    grouped: dict[type, list[Any]] = {}
    for hook in hooks:
        if hasattr(type(hook), method):
            grouped.setdefault(type(hook), []).append(hook)
    return grouped
