"""Which texts of a conversation get embedded: every part of the request counts, not only the last message.

An attacker puts the question wherever the gate does not look (a system or developer prompt, a tool result, an early
turn, a prefilled assistant turn), so every turn of every role is embedded, a long one as overlapping word windows,
and the classifier takes the max over them. A follow-up like "Where was he born?" is about whoever the earlier turns
named, so the recent user turns are also embedded joined together. No window is ever dropped: the embedding is the
cost of a request, so a request that needs more windows than the configured maximum (``LETHE_GATE_MAX_WINDOWS``) is
refused (`GateInputTooLarge`, a 400 at the API) rather than read in part. Alias matching (cheap) reads the whole text
of every turn, whatever its length.
"""

from __future__ import annotations

from classifiers.chunking import word_windows
from classifiers.types import Conversation

JOINED_USER_TURNS = 3
WINDOW_WORDS = 128  # ~170 word pieces: inside MiniLM's 256-piece limit
WINDOW_STRIDE = 96
DEFAULT_MAX_TEXTS = 64


class GateInputTooLarge(ValueError):
    """A conversation needs more embedded windows than the gate reads for one request."""

    def __init__(self, needed: int, limit: int) -> None:
        super().__init__(f"the prompt needs {needed} embedded windows of {WINDOW_WORDS} words; the limit is {limit}")
        self.needed = needed
        self.limit = limit


def texts_to_embed(conversation: Conversation, max_texts: int = DEFAULT_MAX_TEXTS) -> list[str]:
    """The texts whose classifier scores are maxed over for this conversation, in a deterministic order: each turn's
    windows, in turn order, then the recent user turns joined; identical texts once. Raises `GateInputTooLarge`
    when there are more than `max_texts`."""
    texts = _texts(conversation)
    if len(texts) > max_texts:
        raise GateInputTooLarge(len(texts), max_texts)
    return texts


def count_texts(conversation: Conversation) -> int:
    """How many texts `texts_to_embed` reads for this conversation (to refuse it before it is queued for embedding)."""
    return len(_texts(conversation))


def _texts(conversation: Conversation) -> list[str]:
    texts: list[str] = []
    for _, content in conversation:
        texts.extend(word_windows(content, WINDOW_WORDS, WINDOW_STRIDE))
    user_turns = [content for role, content in conversation if role == "user" and content.strip()]
    if len(user_turns) >= 2:
        joined = " ".join(user_turns[-JOINED_USER_TURNS:]).split()
        texts.append(" ".join(joined[-WINDOW_WORDS:]))
    return list(dict.fromkeys(texts))
