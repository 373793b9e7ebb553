"""Cutting text into pieces an embedding can represent: the MiniLM reads at most 256 word pieces, so a long forget
text or a long prompt is embedded as overlapping word windows rather than silently truncated."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9\u00C0-\u024F])")


def sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by a capital, digit or quote); whitespace collapsed."""
    collapsed = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(collapsed) if s]


def word_windows(text: str, max_words: int, stride: int) -> list[str]:
    """`text` as windows of at most `max_words` words, starting every `stride` words; one window if it is short."""
    if stride <= 0 or stride > max_words:
        raise ValueError(f"stride must be in 1..max_words, got {stride} for max_words={max_words}")
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    starts = list(range(0, len(words) - max_words + 1, stride))
    if starts[-1] + max_words < len(words):
        starts.append(len(words) - max_words)
    return [" ".join(words[s : s + max_words]) for s in starts]


def text_chunks(text: str, *, max_words: int = 60, sentences_per_chunk: int = 2) -> list[str]:
    """Forget text as training prompts: groups of consecutive sentences (overlapping by one), long ones windowed.

    Two sentences carry enough context to be about the target (a lone "It won an award." is about nobody) while
    staying as short as the questions users ask.
    """
    sents = sentences(text)
    if len(sents) <= sentences_per_chunk:
        groups = [" ".join(sents)] if sents else []
    else:
        groups = [" ".join(sents[i : i + sentences_per_chunk]) for i in range(len(sents) - sentences_per_chunk + 1)]
    chunks: list[str] = []
    for group in groups:
        chunks.extend(word_windows(group, max_words, max(1, max_words // 2)))
    return list(dict.fromkeys(chunks))
