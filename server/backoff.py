"""Retry pacing for Lethe's background loops (audit writer, registry reload, job heartbeat, metrics refresh).

A loop that meets a failure (the database down, a disk unreadable) must neither die nor hammer what failed: it waits
a delay that doubles from ``initial`` up to ``maximum`` after each consecutive failure and drops back to ``initial``
after a success, so it recovers within ``maximum`` of the cause going away.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float
    maximum: float
    failures: int = field(default=0, init=False)

    def failed(self) -> float:
        """Count one more consecutive failure; the delay to wait before the next try."""
        self.failures += 1
        return self.delay

    def succeeded(self) -> None:
        self.failures = 0

    @property
    def delay(self) -> float:
        """The wait before the next try: ``initial`` while all is well, doubling with each consecutive failure."""
        if self.failures == 0:
            return self.initial
        return min(self.maximum, self.initial * 2 ** (self.failures - 1))
