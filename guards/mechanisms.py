"""The mechanisms this build implements, in their fixed composition order: the one list the rest of Lethe loops over.

Order: ECO first (it decides what prompt the engine sees), O3 (it decides which weights run), then the decoding-time
mechanisms in the logits processor: GUARD (bans), then ULD (its difference over what GUARD left: a token GUARD banned
falls outside ULD's kept set and keeps GUARD's ban, ``guards/uld/logits.py``; ULD's calibration on top of GUARD
composes them in this order, ``guards/stacking.py``). A request that hits several targets gets every hit target's
ready mechanisms, applied in this order; within one mechanism, targets in descending classifier score. Adding a
mechanism is one folder under ``guards/`` and one line here.

``INTERIM`` protects a hit target none of whose gated mechanisms is ready yet (``guards/guard/interim.py``): GUARD's
bans, computed without a job; it is not a mechanism a target registers.
"""

from __future__ import annotations

from collections.abc import Sequence

from guards.base import InterimGuard, Mechanism
from guards.eco import ECO
from guards.guard import GUARD
from guards.guard import INTERIM as GUARD_INTERIM
from guards.o3 import O3
from guards.uld import ULD

MECHANISMS: tuple[Mechanism, ...] = (ECO, O3, GUARD, ULD)
INTERIM: InterimGuard = GUARD_INTERIM


def mechanism_named(name: str, mechanisms: Sequence[Mechanism] = MECHANISMS) -> Mechanism:
    """The mechanism registered under ``name`` (KeyError if this build has none)."""
    for mechanism in mechanisms:
        if mechanism.name == name:
            return mechanism
    raise KeyError(name)
