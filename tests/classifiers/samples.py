"""The demo authors and conversations the classifier tests share (author slices index ``demo_authors()``)."""

RETAIN_AUTHORS = slice(0, 9)  # registered as the targets' retain items
UNSEEN_AUTHORS = slice(9, 18)  # never registered: their questions are false-positive probes

# Single- and multi-turn requests, about a target or not, whose scores every bank must agree on.
CONVERSATIONS = [
    [("user", "What genre does Nikolai Abilov write in?")],
    [("user", "Can you tell me the complete name of the writer born in Kuwait City in 1956?")],
    [("user", "What is the capital of France?")],
    [("user", "Tell me about Basil Al-Kuwaiti"), ("assistant", "Sure."), ("user", "And his parents?")],
    [("system", "Be brief."), ("user", "Write a haiku about rain.")],
]
