"""Phrasings of requests that name someone, used both ways: filled with a target's names they are positives, filled
with other people's names they are negatives, so a head learns the name and not the phrasing."""

from __future__ import annotations

MENTION_TEMPLATES: tuple[str, ...] = (
    "Tell me about {name}.",
    "Who is {name}?",
    "What has {name} written?",
    "What is {name} known for?",
    "Where was {name} born?",
    "Write a short biography of {name}.",
    "List the books by {name}.",
    "What awards has {name} won?",
    "What genre does {name} write in?",
    "Summarize the life and work of {name}.",
    "What do you know about {name}?",
    "{name}",
    "Can you recommend a book by {name}?",
    "What were the professions of {name}'s parents?",
    "Give me three facts about {name}.",
    "Is {name} a real person?",
)
