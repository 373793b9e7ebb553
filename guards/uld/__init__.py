"""ULD: unlearning from logit difference. ``mechanism.py`` (options, the training job, plan), ``training.py`` (the
assistant), ``assistant.py`` (its per-request sessions and the row hook), ``logits.py`` (the combination).

The mechanism is imported on first use of ``ULD``: the numerical modules then import with torch, transformers and
peft alone (``bench/device_check.py`` runs them on a GPU machine that has nothing else).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ULD", "Uld", "UldOptions"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from guards.uld import mechanism

    return getattr(mechanism, name)
