"""Which texts of a conversation get embedded: the whole conversation counts, not only the last message.

A follow-up like "Where was he born?" is about whoever the earlier turns named, so the classifier scores each recent
user turn on its own and the recent user turns joined together, and takes the max over them. A final non-user turn
is a prefilled answer ("continue this text") and is scored too. Alias matching (cheap) reads every turn of every
role; the embedding (the cost of a request) reads at most `MAX_TEXTS` texts, long turns as overlapping windows.
"""

from __future__ import annotations

import numpy as np

from classifiers.chunking import word_windows
from classifiers.types import Conversation

EMBEDDED_ROLES = frozenset({"user"})
MAX_USER_TURNS = 6
JOINED_USER_TURNS = 3
WINDOW_WORDS = 128  # ~170 word pieces: inside MiniLM's 256-piece limit
WINDOW_STRIDE = 96
MAX_TEXTS = 16


def texts_to_embed(conversation: Conversation) -> list[str]:
    """The texts whose classifier scores are maxed over for this conversation, in a deterministic order."""
    user_turns = [content for role, content in conversation if role in EMBEDDED_ROLES and content.strip()]
    recent = user_turns[-MAX_USER_TURNS:]
    texts: list[str] = []
    for content in recent:
        texts.extend(word_windows(content, WINDOW_WORDS, WINDOW_STRIDE))
    if len(recent) >= 2:
        joined = " ".join(recent[-JOINED_USER_TURNS:]).split()
        texts.append(" ".join(joined[-WINDOW_WORDS:]))
    if conversation and conversation[-1][0] not in EMBEDDED_ROLES and conversation[-1][1].strip():
        texts.extend(word_windows(conversation[-1][1], WINDOW_WORDS, WINDOW_STRIDE))
    texts = list(dict.fromkeys(texts))
    if len(texts) > MAX_TEXTS:
        keep = np.unique(np.linspace(0, len(texts) - 1, MAX_TEXTS).round().astype(int))
        texts = [texts[i] for i in keep]
    return texts
