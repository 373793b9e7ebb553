"""A running job's lease on its row, and the heartbeat that renews it.

A claimed job is held by one run: the claim's worker and attempt number (``ClaimedJob``) fence every later write, so
the queue refuses progress, completion or failure from a run that no longer holds the job. The lease lasts
``LETHE_JOB_STALE_AFTER_S`` from its last renewal: past that, any worker's recovery pass may requeue the job for
another run. So a run that cannot renew for longer than the lease (the database down, or the job cancelled or
reclaimed meanwhile) must stop rather than finish alongside a second run: the lease is then *lost*, and the job's next
``progress`` call raises ``JobCancelled``. A handler that reports no progress runs to its end, and its result is then
refused by the fenced completion (``JobQueue.complete``), never committed twice.

The heartbeat retries a failed renewal (database errors are logged once per outage, not per try) and never dies of an
exception; a renewal that finds the job no longer ours loses the lease at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from server.backoff import Backoff
from server.registry.records import ClaimedJob

logger = logging.getLogger(__name__)

RETRY_S = 1.0  # first retry after a failed renewal; doubles up to the heartbeat interval


class Lease:
    """One run's hold on its claimed job: when it was last renewed, and whether it is lost (and why)."""

    def __init__(self, job: ClaimedJob, duration_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self.duration_s = duration_s
        self._clock = clock
        self._renewed_at = clock()
        self._failing_since: float | None = None
        self._lost = threading.Event()
        self.reason: str | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def renewed(self) -> None:
        self._renewed_at = self._clock()
        if self._failing_since is not None:
            logger.info("job.heartbeat_recovered", extra={"job_id": self.job.id,
                                                          "seconds": round(self._renewed_at - self._failing_since, 2)})
            self._failing_since = None

    def renewal_failed(self, error: BaseException) -> None:
        """A renewal could not reach the database; the lease is lost once it has gone unrenewed past its duration."""
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
            logger.warning("job.heartbeat_failed", extra={"job_id": self.job.id, "error": type(error).__name__,
                                                          "lease_s": self.duration_s})
        unrenewed = now - self._renewed_at
        if unrenewed > self.duration_s:
            self.lose(f"lease not renewed for {unrenewed:.1f} s (longer than its {self.duration_s:g} s)")

    def lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self.reason = reason
            self._lost.set()
            logger.warning("job.lease_lost", extra={"job_id": self.job.id, "kind": self.job.kind, "reason": reason})


def keep_alive(lease: Lease, renew: Callable[[], bool], interval_s: float, stop: threading.Event) -> None:
    """Renew ``lease`` every ``interval_s`` until ``stop`` is set or the lease is lost (the heartbeat thread's body).

    ``renew`` returns False when the job is no longer this run's (cancelled, or requeued and claimed again).
    """
    retry = Backoff(min(RETRY_S, interval_s), interval_s)
    delay = interval_s
    while not stop.wait(delay) and not lease.lost:
        try:
            held = renew()
        except Exception as exc:  # a database error must not end the heartbeat: retry, and let the lease decide
            lease.renewal_failed(exc)
            delay = retry.failed()
            continue
        retry.succeeded()
        delay = interval_s
        if held:
            lease.renewed()
        else:
            lease.lose("the job was cancelled or claimed by another run")
