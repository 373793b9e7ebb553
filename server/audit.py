"""Audit trail: one record per inference request (hit or not), written in batches off the request path.

Records carry the OpenAI response id, the targets hit, their scores and the mechanisms applied; never the prompt text
unless ``LETHE_AUDIT_PROMPTS`` is set. Old records are pruned after ``LETHE_AUDIT_RETENTION_DAYS``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.registry.audit_log import AuditLog
from server.registry.records import AuditEntry

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.2
PRUNE_INTERVAL_S = 3600.0


class AuditWriter:
    def __init__(self, log: AuditLog, retention_days: float) -> None:
        self._log = log
        self._retention_s = retention_days * 86400
        self._pending: list[AuditEntry] = []

    def record(self, record: AuditEntry) -> None:
        self._pending.append(record)

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            try:
                await asyncio.to_thread(self._log.write, batch)
            except Exception:
                logger.exception("audit.write_failed", extra={"records": len(batch)})
                self._pending[:0] = batch  # keep them for the next flush rather than lose them

    async def run(self) -> None:
        next_prune = 0.0
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                await self.flush()
                if time.monotonic() >= next_prune:
                    removed = await asyncio.to_thread(self._log.prune, time.time() - self._retention_s)
                    if removed:
                        logger.info("audit.pruned", extra={"records": removed})
                    next_prune = time.monotonic() + PRUNE_INTERVAL_S
        finally:
            await self.flush()
