"""ECO: embedding-corrupted prompts. ``mechanism.py`` (options, plan), ``corruption.py`` (the paper's functions and
the corrupted tokens), ``calibration.py`` + ``sigma_search.py`` (the σ job), ``token_spans.py`` (alias → tokens)."""

from guards.eco.mechanism import Eco, EcoOptions

ECO = Eco()

__all__ = ["ECO", "Eco", "EcoOptions"]
