"""The TOFU evaluation's reply metrics. Both live with the serving code that needs them (``guards/text_metrics.py``):
plain ROUGE-L recall is ECO's calibration objective, ``answer_recall`` what the erasure report's verification counts
as a leak; the evaluation reuses them, never the other way round."""

from __future__ import annotations

from guards.text_metrics import answer_content_words, answer_recall, rouge_l_recall

__all__ = ["answer_content_words", "answer_recall", "rouge_l_recall"]
