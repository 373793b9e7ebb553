"""GUARD: generation-time restriction of forbidden phrases. ``mechanism.py`` (options, the phrase job, plan),
``phrases.py`` (what is forbidden), ``phrase_matcher.py`` (the row hook that bans them while decoding)."""

from guards.guard.mechanism import Guard, GuardOptions

GUARD = Guard()

__all__ = ["GUARD", "Guard", "GuardOptions"]
