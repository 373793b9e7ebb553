"""ULD: unlearning from logit difference. ``mechanism.py`` (options, the training job, plan), ``training.py`` (the
assistant), ``assistant.py`` (its per-request sessions and the row hook), ``logits.py`` (the combination)."""

from guards.uld.mechanism import Uld, UldOptions

ULD = Uld()

__all__ = ["ULD", "Uld", "UldOptions"]
