"""GUARD: generation-time restriction of forbidden phrases. ``mechanism.py`` (options, the phrase job, plan),
``phrases.py`` (what is forbidden), ``phrase_matcher.py`` (the row hook that bans them while decoding), ``interim.py``
(the same bans, without any job, for a target none of whose own mechanisms is ready yet)."""

from guards.guard.interim import InterimProtection
from guards.guard.mechanism import Guard, GuardOptions

GUARD = Guard()
INTERIM = InterimProtection()

__all__ = ["GUARD", "INTERIM", "Guard", "GuardOptions", "InterimProtection"]
