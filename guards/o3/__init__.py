"""O3: OOD gate + orthogonal unlearning LoRA. ``mechanism.py`` (options, the training job, the rank budget, the
per-snapshot adapter stack, plan), ``training.py`` (the LoRA with the orthogonality penalty), ``adapters.py`` (reading,
merging and rank-stacking saved adapters), ``ood.py`` + ``gate.py`` (the gate, fitted with the classifier).

The mechanism is imported on first use of ``O3``: ``training.py`` then imports with torch, transformers and peft
alone (``bench/device_check.py`` runs it on a GPU machine that has nothing else).
"""

from __future__ import annotations

from typing import Any

__all__ = ["O3", "O3Mechanism", "O3Options"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from guards.o3 import mechanism

    return getattr(mechanism, name)
