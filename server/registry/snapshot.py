"""The live, immutable view of the registry that requests are classified against, and its hot reload.

A replica polls the registry revision (``LETHE_REGISTRY_POLL_S``); when it changes, the new snapshot (targets plus a
classifier bank stacked from their artifacts) is built off the event loop and swapped in with one assignment. A request
reads ``holder.current`` once and keeps that snapshot to the end, so a concurrent change never tears it.

Every registered target is in the snapshot, from the revision that created it to the one that deleted it: a target
whose classifier is not fitted (queued, or failed) is in the bank by its aliases alone, and every target that is not
yet ``active`` carries its interim protection, computed here from its record without any job (and stored in the
target's own interim folder, ``interim_factory``, for the engine to read), for the planner to apply when none of its
own gated mechanisms is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guards.base import InterimGuard, TargetEntry
from server.artifacts import interim_store
from server.registry.records import TargetRecord
from server.registry.targets import TargetStore

logger = logging.getLogger(__name__)

BankFactory = Callable[[dict[str, Path], dict[str, list[str]], list[str]], Any]
"""Builds the prompt classifiers' bank from {target_id: classifier artifact dir} of the fitted targets, every target's
current {target_id: aliases} (those without an artifact are alias-only; called with one target at least) and the
operators' negatives, which its registry-wide calibration keeps unflagged."""
GateBankFactory = Callable[[dict[str, dict[str, Any]], dict[str, Path]], dict[str, Any]]
"""({target_id: its mechanisms}, {target_id: classifier artifact dir}) -> {gate name: bank} of mechanisms' own gates."""
Sharer = Callable[[list[TargetEntry]], Any]
"""A mechanism's ``share``: per-snapshot resources from every target that enables it."""
InterimFactory = Callable[[TargetRecord], Any]
"""``guards.base.InterimGuard.prepare``: a target's interim protection, from its record alone (``interim_factory``)."""


def interim_factory(interim: InterimGuard, artifacts_root: Path) -> InterimFactory:
    """``interim.prepare`` lent each target's own interim store (``server.artifacts.interim_store``)."""
    return lambda record: interim.prepare(record, interim_store(artifacts_root, record.id))


def mechanism_entries(records: list[TargetRecord], name: str) -> list[TargetEntry]:
    """Every target's registration of mechanism ``name`` (options and published state)."""
    return [TargetEntry(r.id, r.mechanisms[name].get("options", {}), r.mechanisms[name].get("state") or {})
            for r in records if name in r.mechanisms]


@dataclass(frozen=True)
class RegistrySnapshot:
    revision: int
    targets: dict[str, TargetRecord] = field(default_factory=dict)
    bank: Any = None  # the prompt classifiers (ClassifierBank)
    gates: dict[str, Any] = field(default_factory=dict)  # gate name -> bank of mechanisms' own gates (O3's OOD)
    shared: dict[str, Any] = field(default_factory=dict)  # mechanism -> what its ``share`` built
    interim: dict[str, Any] = field(default_factory=dict)  # target_id -> its interim protection (targets not active)
    loaded_at: float = field(default_factory=time.time)

    @property
    def empty(self) -> bool:
        return not self.targets

    @property
    def degraded(self) -> int:
        """How many targets are ``degraded``: their classifier (or its refit after a patch) could not be fitted."""
        return sum(target.status == "degraded" for target in self.targets.values())


class SnapshotHolder:
    def __init__(self, targets: TargetStore, artifact_path: Callable[[str], Path], bank_factory: BankFactory,
                 poll_s: float, gate_factory: GateBankFactory | None = None,
                 interim: InterimFactory | None = None, negatives: Callable[[], list[str]] = list) -> None:
        self._targets = targets
        self._negatives = negatives
        self._artifact_path = artifact_path
        self._bank_factory = bank_factory
        self._gate_factory = gate_factory
        self._interim = interim
        self._poll_s = poll_s
        self._sharers: dict[str, Sharer] = {}
        self.current = RegistrySnapshot(revision=-1)
        self.on_swap: list[Callable[[RegistrySnapshot], None]] = []

    def load(self) -> RegistrySnapshot:
        """Read the registry and build a snapshot (blocking: call from a thread)."""
        revision, records = self._targets.snapshot_rows()
        targets = {record.id: record for record in records}
        artifacts = {record.id: self._artifact_path(record.classifier["artifact"]) for record in records
                     if record.classifier_ready}
        aliases = {record.id: list(record.aliases) for record in records}  # current: a patch applies before its refit
        # Read after the revision: a negative added meanwhile moves the revision on, and the next poll rebuilds.
        bank = self._bank_factory(artifacts, aliases, self._negatives()) if targets else None
        enabled = {tid: target.mechanisms for tid, target in targets.items()}
        gates = self._gate_factory(enabled, artifacts) if artifacts and self._gate_factory is not None else {}
        return RegistrySnapshot(revision=revision, targets=targets, bank=bank, gates=gates, shared=self._share(records),
                                interim=self._interim_protections(records))

    def share_with(self, sharers: dict[str, Sharer]) -> None:
        """Let mechanisms build per-snapshot resources; the next ``refresh(force=True)`` builds them."""
        self._sharers = dict(sharers)

    def _share(self, records: list[TargetRecord]) -> dict[str, Any]:
        """Each mechanism's shared resources; one that fails gets None (its plans then fail closed), the rest load."""
        shared: dict[str, Any] = {}
        for name, sharer in self._sharers.items():
            entries = mechanism_entries(records, name)
            try:
                shared[name] = sharer(entries) if entries else None
            except Exception:
                logger.exception("registry.share_failed", extra={"mechanism": name})
                shared[name] = None
        return shared

    def _interim_protections(self, records: list[TargetRecord]) -> dict[str, Any]:
        """The interim protection of every target not yet ``active``; one that cannot be computed is left out (its
        hits then fail closed) and logged, the rest load."""
        interim: dict[str, Any] = {}
        if self._interim is None:
            return interim
        for record in records:
            if record.status == "active":
                continue
            try:
                interim[record.id] = self._interim(record)
            except Exception:
                logger.exception("registry.interim_failed", extra={"target_id": record.id})
        return interim

    def refresh(self, force: bool = False) -> bool:
        """Swap in a new snapshot if the revision moved (or ``force``); True if it did (blocking)."""
        if not force and self._targets.revision() == self.current.revision:
            return False
        snapshot = self.load()
        if force or snapshot.revision != self.current.revision:
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
