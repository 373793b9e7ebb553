"""The job worker: claims queued jobs from the registry database and runs them (SPEC §8).

The embedded default runs one worker thread per job lane inside ``lethe serve``; ``lethe worker`` runs the same loops
in its own process (one training box, many serving replicas), for all lanes or those given with ``--lanes``. A worker
claims only the job kinds it has handlers for, which ``control_plane.make_workers`` splits by lane
(``guards.base.LANES``). A running job heart-beats; a job whose worker died (crash,
``kill -9``) stops heart-beating and is requeued by any worker's recovery pass until its attempts run out, then marked
failed — never left "running" forever. The heartbeat renews the run's lease through database outages; a run that
cannot renew it for longer than the lease stops, and a run that lost its job never commits its result
(``server/job_lease.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from guards.job_interface import JobHandler
from server.artifacts import ArtifactStore
from server.backoff import Backoff
from server.errors import NotFound
from server.job_lease import Lease, keep_alive
from server.registry import Registry
from server.registry.records import ClaimedJob, TargetRecord

logger = logging.getLogger(__name__)

MAX_LOOP_BACKOFF_S = 30.0  # a worker polls a database that is down at most this rarely


class JobCancelled(Exception):
    """The job was cancelled (its target changed or was deleted) while it ran."""


@dataclass
class JobContext:
    """What a handler gets (``guards.base.JobContext``): its job, its target, where to put artifacts, and a progress
    callback."""

    job: ClaimedJob
    target: TargetRecord
    artifacts: ArtifactStore
    _report: Callable[[float, str], bool]
    _lost: Callable[[], bool] = field(default=lambda: False)  # the lease, as the heartbeat last found it
    last: tuple[float, str] = field(default=(0.0, "started"))

    @property
    def job_id(self) -> str:
        return self.job.id

    def progress(self, fraction: float, message: str) -> None:
        self.last = (fraction, message)
        if not self._report(fraction, message):
            raise JobCancelled(self.job.id)

    def check_cancelled(self) -> None:
        """Raise ``JobCancelled`` once the heartbeat has found the job cancelled or claimed by another run."""
        if self._lost():
            raise JobCancelled(self.job.id)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobWorker:
    def __init__(
        self,
        registry: Registry,
        artifacts: ArtifactStore,
        handlers: dict[str, JobHandler],
        *,
        worker_id: str | None = None,
        lane: str | None = None,
        poll_s: float = 0.5,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 60.0,
    ) -> None:
        self._jobs = registry.jobs
        self._targets = registry.targets
        self._artifacts = artifacts
        self._handlers = handlers
        self.worker_id = worker_id or default_worker_id()
        self.lane = lane
        self._poll_s = poll_s
        # A lease renewed less often than it goes stale would be recovered (and run again) while its run is healthy.
        self._heartbeat_s = min(heartbeat_s, stale_after_s / 3)
        self._stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        name = f"lethe-job-worker-{self.lane}" if self.lane else "lethe-job-worker"
        self._thread = threading.Thread(target=self.run_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        logger.info("worker.started", extra={"worker": self.worker_id, "lane": self.lane,
                                             "kinds": sorted(self._handlers)})
        next_recovery = 0.0
        retry = Backoff(self._poll_s * 4, MAX_LOOP_BACKOFF_S)
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_recovery:
                    self._jobs.recover_stale(self._stale_after_s)
                    next_recovery = time.monotonic() + self._stale_after_s / 4
                if not self.run_once():
                    self._stop.wait(self._poll_s)
                retry.succeeded()
            except Exception as exc:  # a database outage must not kill the worker: log it, back off, poll again
                if retry.failures:
                    logger.warning("worker.loop_error", extra={"worker": self.worker_id, "error": type(exc).__name__,
                                                               "failures": retry.failures + 1})
                else:
                    logger.exception("worker.loop_error", extra={"worker": self.worker_id})
                self._stop.wait(retry.failed())

    # ------------------------------------------------------------ one job

    @property
    def kinds(self) -> list[str]:
        """The job kinds this worker claims (its lane's, that it has handlers for)."""
        return sorted(self._handlers)

    def run_once(self) -> bool:
        """Claim and run one job of its kinds; False if there was none."""
        job = self._jobs.claim(self.worker_id, self.kinds)
        if job is None:
            return False
        started = time.perf_counter()
        logger.info("job.started", extra={"job_id": job.id, "kind": job.kind, "attempt": job.attempts})
        try:
            target = self._targets.record(job.target_id) if job.target_id else None
        except NotFound:
            target = None
        if target is None:  # deleted between being queued and being claimed
            self._jobs.cancel(job, "target deleted")
            logger.info("job.cancelled", extra={"job_id": job.id, "reason": "target deleted"})
            return True
        # Staging folders named after this attempt: removed here if it fails, by the erasure pass if it died.
        artifacts = self._artifacts.owned_by(f"{job.id}.{job.attempts}")
        lease = Lease(job, self._stale_after_s)
        context = JobContext(job=job, target=target, artifacts=artifacts,
                             _report=lambda fraction, message: self._report(lease, fraction, message),
                             _lost=lambda: lease.lost)
        heartbeat_stop = threading.Event()
        heartbeat = threading.Thread(target=keep_alive, name=f"lethe-heartbeat-{job.id}", daemon=True,
                                     args=(lease, lambda: self._jobs.report_progress(job, *context.last),
                                           self._heartbeat_s, heartbeat_stop))
        heartbeat.start()
        try:
            result = self._handlers[job.kind](context)
        except JobCancelled:
            artifacts.discard_staging()
            logger.info("job.cancelled", extra={"job_id": job.id, "reason": lease.reason or "cancelled"})
        except Exception as exc:
            logger.exception("job.failed", extra={"job_id": job.id, "kind": job.kind})
            artifacts.discard_staging()  # before a retry can claim the job
            error = f"{type(exc).__name__}: {exc}"
            self._finish(job, "fail", lambda: self._jobs.fail(job, error))
        else:
            if self._finish(job, "complete", lambda: self._jobs.complete(job, result)):
                logger.info("job.succeeded", extra={"job_id": job.id,
                                                    "seconds": round(time.perf_counter() - started, 2)})
        finally:
            heartbeat_stop.set()
            heartbeat.join()
        return True

    def _report(self, lease: Lease, fraction: float, message: str) -> bool:
        """A handler's progress report; False stops it (``JobCancelled``). A database error is not the handler's
        failure: the report is skipped, and the lease (renewed by the heartbeat) decides whether the run goes on."""
        if lease.lost:
            return False
        try:
            held = self._jobs.report_progress(lease.job, fraction, message)
        except Exception as exc:
            lease.renewal_failed(exc)
            return not lease.lost
        if not held:
            lease.lose("the job was cancelled or claimed by another run")
        else:
            lease.renewed()
        return held

    def _finish(self, job: ClaimedJob, outcome: str, write: Callable[[], bool]) -> bool:
        """Record a run's outcome, retrying through a database outage for up to the lease (it is fenced, so a late
        write can never overwrite another run's); True if written, False if the job was no longer this run's or the
        database stayed unreachable (the recovery pass then requeues the job)."""
        retry = Backoff(self._poll_s, self._heartbeat_s)
        deadline = time.monotonic() + self._stale_after_s
        while True:
            try:
                written = write()
            except Exception as exc:
                if time.monotonic() >= deadline or self._stop.is_set():
                    logger.error("job.outcome_unrecorded", extra={"job_id": job.id, "outcome": outcome,
                                                                  "error": type(exc).__name__})
                    return False
                if not retry.failures:
                    logger.warning("job.outcome_retry", extra={"job_id": job.id, "outcome": outcome,
                                                               "error": type(exc).__name__})
                self._stop.wait(retry.failed())
                continue
            if not written:
                logger.warning("job.outcome_discarded", extra={"job_id": job.id, "outcome": outcome,
                                                               "reason": "the job is no longer this run's"})
            return written
