"""Erasure on delete: what runs after ``DELETE /admin/v1/targets/{id}`` until nothing of the target is left.

The deletion itself (``TargetStore.delete``) removes the target's row, blanks its jobs' messages, redacts the audit
prompts that hit it and leaves a tombstone. Its artifacts cannot go at once: a replica still serving the previous
revision may read them (GUARD's phrases, ULD's assistant and O3's stacked adapter load on first use). So every replica
reports the revision it serves (``ReplicaReporter``), and every ``LETHE_ERASURE_INTERVAL_S`` each replica runs one
``ErasurePass``:

1. redact again the audit prompts of the deletions not yet purged (a request in flight at the deletion is audited
   after it);
2. remove staging folders whose job is over, and job-less ones older than ``LETHE_STAGING_GRACE_S``;
3. once every live replica (reported within ``LETHE_REPLICA_STALE_S``) serves the current revision, delete every
   artifact no live target references and every O3 stack built from one (an artifact two targets share by content
   stays while either uses it; one written within ``LETHE_ERASURE_GRACE_S`` stays, its job may not have published it
   yet); replicas rebuild their stacks without the deleted target's adapter when they load the deletion's revision
   (and drop its interim phrases, kept in memory of their own: ``server.artifacts.LocalInterim``);
4. when 3 left nothing unreferenced, scrub the database files (``RegistryDatabase.scrub``: SQLite checkpoint,
   PostgreSQL VACUUM) and mark the tombstones purged.

Every step is idempotent and safe when several replicas run it at once, so no leader is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.artifact_gc import ArtifactCollector
from server.registry import Registry
from server.registry.replicas import STARTING

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 5.0  # a replica's heartbeat; a change of its serving revision is reported at once


def replica_id() -> str:
    """Unique per process, also across hosts that reuse pids (containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class ErasureReport:
    """What one pass did (for its log line and the tests)."""

    revision: int
    lagging: list[str] = field(default_factory=list)  # live replicas behind ``revision``: artifacts wait for them
    artifacts_removed: list[str] = field(default_factory=list)
    artifacts_kept: int = 0  # unreferenced but too recent (or failed to delete)
    staging_removed: list[str] = field(default_factory=list)
    audit_redacted: int = 0
    scrubbed: bool = False
    purged: list[str] = field(default_factory=list)  # target ids whose tombstones were marked purged


class ErasurePass:
    def __init__(self, registry: Registry, collector: ArtifactCollector, replica_stale_s: float) -> None:
        self._registry = registry
        self._collector = collector
        self._replica_stale_s = replica_stale_s
        self._scrubbed_once = False  # a replica's first pass scrubs once (deletions from before this version)

    def run_once(self) -> ErasureReport:
        state = self._registry.erasure.state()
        report = ErasureReport(revision=state.revision)
        pending = [tombstone.target_id for tombstone in state.pending]
        if pending:
            report.audit_redacted = self._registry.erasure.redact(pending)
        report.staging_removed = self._collector.sweep_staging(self._registry.jobs.open_among)
        replicas = self._registry.replicas.live(self._replica_stale_s)
        report.lagging = [replica.id for replica in replicas if replica.serving_revision < state.revision]
        swept = False
        if not report.lagging:
            sweep = self._collector.sweep_artifacts(state.referenced)
            report.artifacts_removed, report.artifacts_kept, swept = sweep.removed, sweep.kept, sweep.complete
        # The rows went with the deletion; their copies in the database files go with the artifacts (on PostgreSQL a
        # full vacuum per pass while a replica lags would lock the tables for nothing), and once per replica start.
        if (pending and swept) or not self._scrubbed_once:
            report.scrubbed = self._registry.database.scrub()
            self._scrubbed_once = self._scrubbed_once or report.scrubbed
        if pending and swept and report.scrubbed:
            self._registry.erasure.mark_purged(pending)
            report.purged = pending
        self._log(report, bool(pending))
        return report

    def _log(self, report: ErasureReport, pending: bool) -> None:
        if report.purged:
            logger.info("erasure.purged", extra={"targets": report.purged, "revision": report.revision,
                                                 "artifacts": len(report.artifacts_removed),
                                                 "audit_redacted": report.audit_redacted})
        elif pending:
            logger.info("erasure.waiting", extra={"revision": report.revision, "lagging_replicas": report.lagging,
                                                  "artifacts_kept": report.artifacts_kept,
                                                  "scrubbed": report.scrubbed})
        if report.artifacts_removed or report.staging_removed:
            logger.info("erasure.swept", extra={"artifacts": report.artifacts_removed,
                                                "staging": report.staging_removed})

    async def run(self, interval_s: float) -> None:
        """Forever, off the event loop; a failed pass is logged and the next one retries everything."""
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:
                logger.exception("erasure.pass_failed")
            await asyncio.sleep(interval_s)


class ReplicaReporter:
    """Reports this replica's serving revision: at once when it changes, else every ``REPORT_INTERVAL_S``."""

    def __init__(self, registry: Registry, serving_revision: Callable[[], int], poll_s: float) -> None:
        self.id = replica_id()
        self._registry = registry
        self._serving_revision = serving_revision
        self._poll_s = poll_s

    def starting(self) -> None:
        """Announce the replica before it reads its first snapshot, so no purge runs under it meanwhile. A replica
        starts even when the database is down (it serves once a snapshot loads); ``run`` reports as soon as it can,
        and no purge can run before the database is back anyway."""
        try:
            self._registry.replicas.report(self.id, STARTING)
        except Exception:
            logger.exception("replica.report_failed", extra={"replica": self.id})

    async def run(self) -> None:
        reported, next_report = None, 0.0
        while True:
            revision = self._serving_revision()
            if revision != reported or time.monotonic() >= next_report:
                try:
                    await asyncio.to_thread(self._registry.replicas.report, self.id, revision)
                    reported, next_report = revision, time.monotonic() + REPORT_INTERVAL_S
                except Exception:
                    logger.exception("replica.report_failed", extra={"replica": self.id})
            await asyncio.sleep(self._poll_s)

    def leave(self) -> None:
        try:
            self._registry.replicas.leave(self.id)
        except Exception:
            logger.exception("replica.leave_failed", extra={"replica": self.id})
