"""Audit trail: one record per inference request (hit or not), written in batches off the request path.

Records carry the OpenAI response id, the targets hit, their scores and the mechanisms applied; never the prompt text
unless ``LETHE_AUDIT_PROMPTS`` is set. Old records are pruned after ``LETHE_AUDIT_RETENTION_DAYS``.

The writer outlives the database (docs/operations.md, "Background work and failures"): no error ends its loop. While
the database is unreachable, records wait in a buffer bounded by ``LETHE_AUDIT_BUFFER_MIB`` (the oldest are dropped
past it, counted by ``lethe_audit_dropped_total{reason="buffer_full"}``) and writes are retried with a backoff; they
are written once it returns. A batch the database refuses is written record by record, so a record it refuses on its
own is dropped alone (``reason="rejected"``, logged by request id) and never blocks the records behind it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque

from server.backoff import Backoff
from server.metrics import Metrics
from server.registry.audit_log import AuditLog
from server.registry.records import AuditEntry

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.2
MAX_BACKOFF_S = 30.0
PRUNE_INTERVAL_S = 3600.0
PRUNE_RETRY_S = 60.0
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
RECORD_OVERHEAD_BYTES = 1024  # a record without its prompt: the dataclass, its lists and dicts, their ids
DROP_LOG_INTERVAL_S = 10.0  # during an outage every request would drop one: log the drops at most this often


def record_size(record: AuditEntry) -> int:
    """What a waiting record costs in memory, roughly: the buffer's bound is on this, so prompts count in full."""
    return RECORD_OVERHEAD_BYTES + (sys.getsizeof(record.prompt) if record.prompt else 0)


class AuditWriter:
    def __init__(self, log: AuditLog, retention_days: float, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 metrics: Metrics | None = None) -> None:
        self._log = log
        self._retention_s = retention_days * 86400
        self._buffer_bytes = buffer_bytes
        self._metrics = metrics
        self._pending: deque[tuple[AuditEntry, int]] = deque()
        self._pending_bytes = 0
        self._writing = 0  # records of the batch being written now
        self._dropped_unlogged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S

    @property
    def pending(self) -> int:
        """Records waiting to be written, those being written included."""
        return len(self._pending) + self._writing

    def record(self, record: AuditEntry) -> None:
        """Queue one record (on the event loop; never blocks, never raises)."""
        self._keep([record], at_front=False)

    async def flush(self) -> bool:
        """Write what is waiting; False if the database was unreachable (the unwritten records stay queued)."""
        batch = [record for record, _ in self._pending]
        self._pending.clear()
        self._pending_bytes = 0
        if not batch:
            return True
        self._writing = len(batch)
        try:
            unwritten = await asyncio.to_thread(self._write, batch)
        except Exception:  # not expected (``_write`` handles the database's errors); keep the records regardless
            logger.exception("audit.write_failed", extra={"records": len(batch)})
            unwritten = batch
        finally:
            self._writing = 0
        self._keep(unwritten, at_front=True)
        if unwritten:
            self._count_failure("audit_write")
        return not unwritten

    async def run(self) -> None:
        """Flush every ``FLUSH_INTERVAL_S`` and prune hourly until cancelled; failures back off, never end the loop."""
        backoff = Backoff(FLUSH_INTERVAL_S, MAX_BACKOFF_S)
        next_prune = 0.0
        try:
            while True:
                await asyncio.sleep(backoff.delay)
                if await self.flush():
                    if backoff.failures:
                        logger.info("audit.write_recovered", extra={"failures": backoff.failures})
                    backoff.succeeded()
                else:
                    logger.warning("audit.write_deferred", extra={"pending": self.pending,
                                                                  "retry_in_s": backoff.failed()})
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + (PRUNE_INTERVAL_S if await self._prune() else PRUNE_RETRY_S)
        finally:
            await self.flush()

    async def _prune(self) -> bool:
        try:
            removed = await asyncio.to_thread(self._log.prune, time.time() - self._retention_s)
        except Exception as exc:
            logger.warning("audit.prune_failed", extra={"error": type(exc).__name__, "retry_in_s": PRUNE_RETRY_S})
            self._count_failure("audit_prune")
            return False
        if removed:
            logger.info("audit.pruned", extra={"records": removed})
        return True

    def _write(self, batch: list[AuditEntry]) -> list[AuditEntry]:
        """Write ``batch`` (blocking: runs in a thread); returns the records left unwritten by an outage.

        One transaction for the batch; if it fails, one per record, so that a record the database refuses on its own
        is dropped alone. A record that fails while the audit table cannot even be read is an outage: it and the rest
        are kept for the next try.
        """
        try:
            self._log.write(batch)
            return []
        except Exception as exc:
            failure = type(exc).__name__
        for index, record in enumerate(batch):
            try:
                self._log.write([record])
            except Exception as exc:
                if not self._log.reachable():
                    logger.warning("audit.database_unreachable", extra={"error": failure,
                                                                        "unwritten": len(batch) - index})
                    return batch[index:]
                # Only the exception's type: its message could quote the record, and so the prompt.
                logger.error("audit.record_rejected", extra={"request_id": record.request_id,
                                                             "error": type(exc).__name__})
                if self._metrics is not None:
                    self._metrics.audit_dropped.labels("rejected").inc()
        return []

    def _keep(self, records: list[AuditEntry], at_front: bool) -> None:
        """Queue records (unwritten ones go back in front, in order), then drop the oldest past the memory bound."""
        sized = [(record, record_size(record)) for record in records]
        if at_front:
            self._pending.extendleft(reversed(sized))
        else:
            self._pending.extend(sized)
        self._pending_bytes += sum(size for _, size in sized)
        dropped = 0
        while self._pending_bytes > self._buffer_bytes and self._pending:
            _, size = self._pending.popleft()
            self._pending_bytes -= size
            dropped += 1
        self._dropped_unlogged += dropped
        if self._dropped_unlogged and time.monotonic() - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            logger.warning("audit.buffer_full", extra={"dropped": self._dropped_unlogged, "pending": self.pending,
                                                       "buffer_bytes": self._buffer_bytes})
            self._dropped_unlogged, self._drop_logged_at = 0, time.monotonic()
        if self._metrics is not None:
            if dropped:
                self._metrics.audit_dropped.labels("buffer_full").inc(dropped)
            self._metrics.audit_pending.set(self.pending)

    def _count_failure(self, task: str) -> None:
        if self._metrics is not None:
            self._metrics.background_failures.labels(task).inc()
