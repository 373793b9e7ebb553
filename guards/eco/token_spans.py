"""Which prompt tokens a character span covers: alias mentions (found in conversation turns) onto token positions.

The classifier reports alias mentions as character offsets into one conversation turn's content; ECO needs the
positions of the tokens that spell them in the rendered prompt (chat template included). A turn's content is located
in the rendered text, and the tokenizer's offset mapping turns characters into tokens. When that is impossible (the
client sent token ids, or a template rewrote the content) callers fall back to coarser masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from classifiers.types import AliasSpan
from guards.base import PromptView

Offsets = list[tuple[int, int]]


def token_offsets(tokenizer: Any, prompt: PromptView) -> Offsets | None:
    """(start, end) character offsets of each prompt token in ``prompt.text``; None if they cannot be trusted."""
    if not prompt.from_text:
        return None
    encoded = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(prompt.token_ids):
        return None
    return [tuple(pair) for pair in encoded["offset_mapping"]]


def turn_starts(prompt: PromptView) -> list[int | None]:
    """Where each turn's content begins in the rendered text (None if the template did not keep it verbatim)."""
    starts: list[int | None] = []
    cursor = 0
    for _, content in prompt.turns:
        position = prompt.text.find(content, cursor) if content else -1
        if position < 0:
            starts.append(None)
            continue
        starts.append(position)
        cursor = position + len(content)
    return starts


def tokens_in_ranges(offsets: Offsets, ranges: Iterable[tuple[int, int]]) -> list[int]:
    """Positions of tokens overlapping any [start, end) character range (special tokens have empty offsets)."""
    ranges = list(ranges)
    return [
        position
        for position, (start, end) in enumerate(offsets)
        if end > start and any(start < range_end and end > range_start for range_start, range_end in ranges)
    ]


def alias_token_positions(prompt: PromptView, offsets: Offsets, spans: Sequence[AliasSpan]) -> list[int]:
    """Tokens that spell the alias mentions; mentions in turns the template did not keep verbatim are skipped."""
    starts = turn_starts(prompt)
    ranges = []
    for span in spans:
        turn = 0 if span.turn is None else span.turn
        if turn < len(starts) and starts[turn] is not None:
            base = starts[turn]
            ranges.append((base + span.start, base + span.end))
    return tokens_in_ranges(offsets, ranges)


def user_content_positions(prompt: PromptView, offsets: Offsets | None, special_ids: frozenset[int]) -> list[int]:
    """Every token of the user turns' content (template tokens excluded), or every non-special token without offsets."""
    if offsets is not None:
        starts = turn_starts(prompt)
        ranges = [(start, start + len(content)) for (role, content), start in zip(prompt.turns, starts)
                  if role == "user" and start is not None]
        positions = tokens_in_ranges(offsets, ranges)
        if positions:
            return positions
    return [position for position, token in enumerate(prompt.token_ids) if token not in special_ids]
