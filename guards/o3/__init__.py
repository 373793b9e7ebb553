"""O3: OOD gate + orthogonal unlearning LoRA. ``mechanism.py`` (options, the training job, the rank budget, the
per-snapshot adapter stack, plan), ``training.py`` (the LoRA with the orthogonality penalty), ``adapters.py`` (reading,
merging and rank-stacking saved adapters), ``ood.py`` + ``gate.py`` (the gate, fitted with the classifier)."""

from guards.o3.mechanism import O3Mechanism, O3Options

O3 = O3Mechanism()

__all__ = ["O3", "O3Mechanism", "O3Options"]
