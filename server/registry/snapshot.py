"""The live, immutable view of the registry that requests are classified against, and its hot reload.

A replica polls the registry revision (``LETHE_REGISTRY_POLL_S``); when it changes, the new snapshot (targets plus a
classifier bank stacked from their artifacts) is built off the event loop and swapped in with one assignment. A request
reads ``holder.current`` once and keeps that snapshot to the end, so a concurrent change never tears it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.registry.store import RegistryStore, TargetRecord

logger = logging.getLogger(__name__)

BankFactory = Callable[[dict[str, Path]], Any]
"""Builds a classifier bank from {target_id: artifact dir}; None when there are no targets."""


@dataclass(frozen=True)
class RegistrySnapshot:
    revision: int
    targets: dict[str, TargetRecord] = field(default_factory=dict)
    bank: Any = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def empty(self) -> bool:
        return not self.targets


class SnapshotHolder:
    def __init__(self, store: RegistryStore, artifact_path: Callable[[str], Path], bank_factory: BankFactory,
                 poll_s: float) -> None:
        self._store = store
        self._artifact_path = artifact_path
        self._bank_factory = bank_factory
        self._poll_s = poll_s
        self.current = RegistrySnapshot(revision=-1)
        self.on_swap: list[Callable[[RegistrySnapshot], None]] = []

    def load(self) -> RegistrySnapshot:
        """Read the registry and build a snapshot (blocking: call from a thread)."""
        revision, records = self._store.snapshot_rows()
        targets = {record.id: record for record in records}
        artifacts = {record.id: self._artifact_path(record.classifier["artifact"]) for record in records}
        bank = self._bank_factory(artifacts) if artifacts else None
        return RegistrySnapshot(revision=revision, targets=targets, bank=bank)

    def refresh(self) -> bool:
        """Swap in a new snapshot if the revision moved; True if it did (blocking)."""
        if self._store.revision() == self.current.revision:
            return False
        snapshot = self.load()
        if snapshot.revision != self.current.revision:
            self.current = snapshot
            logger.info("registry.reloaded", extra={"revision": snapshot.revision, "targets": len(snapshot.targets)})
            for callback in self.on_swap:
                callback(snapshot)
        return True

    async def watch(self) -> None:
        """Poll forever; errors are logged and retried, the last good snapshot keeps serving."""
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                logger.exception("registry.reload_failed")
            await asyncio.sleep(self._poll_s)
