"""The live, immutable view of the registry that requests are classified against, and its hot reload.

A replica polls the registry revision (``LETHE_REGISTRY_POLL_S``); when it changes, the new snapshot (targets plus a
classifier bank stacked from their artifacts) is built off the event loop and swapped in with one assignment. A request
reads ``holder.current`` once and keeps that snapshot to the end, so a concurrent change never tears it.

Every registered target is in the snapshot, from the revision that created it to the one that deleted it: a target
whose classifier is not fitted (queued, or failed) is in the bank by its aliases alone, and every target that is not
yet ``active`` carries its interim protection, computed here from its record without any job (and stored in the
target's own interim folder in the replica's memory, ``interim_factory``, for the engine to read), for the planner to
apply when none of its own gated mechanisms is ready.

A reload loads per target (``readable.py``): an artifact this replica cannot read degrades its own target, and every
other target, new registration and delete still applies. A reload that fails as a whole keeps the last snapshot
serving and is retried with a backoff; until a first snapshot is loaded (``loaded``), the replica is not ready and
serves nothing. The holder tells the two ways a reload fails apart (``health``): the registry unreachable
(``UNREACHABLE``: every replica is then in the same place) or the registry answering while this replica fails to build
its snapshot (``LOAD_FAILED``: others may serve what it cannot), and how long ago it last confirmed its snapshot
current; ``server/health.py`` decides readiness from that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guards.base import InterimGuard, TargetEntry
from server.artifacts import interim_store
from server.backoff import Backoff
from server.registry.database import UNREACHABLE_ERRORS
from server.registry.readable import CLASSIFIER, ArtifactChecker, ClassifierCheck, degrade, describe
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


UNREACHABLE = "unreachable"
"""A reload failed reading the registry: the database is down or unreachable (``UNREACHABLE_ERRORS``)."""
LOAD_FAILED = "load_failed"
"""A reload failed otherwise: the registry answered, and this replica could not build or load the snapshot."""


@dataclass(frozen=True)
class RegistryHealth:
    """How current a replica's snapshot is, from what the holder already knows (no query)."""

    revision: int  # of the snapshot served; -1 before the first is loaded
    staleness_s: float  # since the snapshot was last confirmed current (before any confirmation: since the start)
    failure: str | None  # the kind of the current run of failed reloads (UNREACHABLE, LOAD_FAILED), None if none

    @property
    def loaded(self) -> bool:
        return self.revision >= 0

    @property
    def reachable(self) -> bool:
        return self.failure != UNREACHABLE

    @property
    def load_failing(self) -> bool:
        return self.failure == LOAD_FAILED


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
    unreadable: dict[str, dict[str, str]] = field(default_factory=dict)  # target_id -> {part: why} (``readable.py``)
    loaded_at: float = field(default_factory=time.time)

    @property
    def loaded(self) -> bool:
        """Whether this is a snapshot of the registry (the holder's placeholder before the first load is not)."""
        return self.revision >= 0

    @property
    def empty(self) -> bool:
        return not self.targets

    @property
    def degraded(self) -> int:
        """How many targets are served ``degraded``: their classifier (or its refit after a patch) could not be
        fitted, or an artifact of theirs cannot be read here."""
        return sum(target.status == "degraded" for target in self.targets.values())


class SnapshotHolder:
    def __init__(self, targets: TargetStore, artifact_path: Callable[[str], Path], bank_factory: BankFactory,
                 poll_s: float, gate_factory: GateBankFactory | None = None,
                 interim: InterimFactory | None = None, negatives: Callable[[], list[str]] = list,
                 classifier_check: ClassifierCheck | None = None, max_backoff_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._targets = targets
        self._negatives = negatives
        self._artifact_path = artifact_path
        self._bank_factory = bank_factory
        self._gate_factory = gate_factory
        self._interim = interim
        self._poll_s = poll_s
        self._max_backoff_s = max_backoff_s
        self._checker = ArtifactChecker(artifact_path, classifier_check)
        self._sharers: dict[str, Sharer] = {}
        self._rebuild = False  # the next refresh rebuilds even at the same revision (a forced one failed)
        self._failures = 0  # consecutive failed reloads
        self._clock = clock
        self._confirmed_at = clock()  # when a refresh last found the snapshot current, or swapped one in
        self.failure: str | None = None  # UNREACHABLE or LOAD_FAILED while reloads fail
        self.current = RegistrySnapshot(revision=-1)
        self.on_swap: list[Callable[[RegistrySnapshot], None]] = []
        self.on_failure: list[Callable[[BaseException], None]] = []

    def load(self) -> RegistrySnapshot:
        """Read the registry and build a snapshot, per target (blocking: call from a thread)."""
        revision, records = self._targets.snapshot_rows()
        served = self._checker.served(records)
        records, unreadable = served.records, served.unreadable
        artifacts = {record.id: self._artifact_path(record.classifier["artifact"]) for record in records
                     if record.classifier_ready}
        enabled = {record.id: record.mechanisms for record in records}
        gates, broken = self._gates(enabled, artifacts)
        if broken:  # a gate fitted with the classifier cannot be read: the classifier artifact is unreadable
            for target_id, why in broken.items():
                unreadable[target_id] = {**unreadable.get(target_id, {}), CLASSIFIER: why}
                artifacts.pop(target_id)
            records = [degrade(record, unreadable[record.id]) if record.id in broken else record
                       for record in records]
        targets = {record.id: record for record in records}
        aliases = {record.id: list(record.aliases) for record in records}  # current: a patch applies before its refit
        # Read after the revision: a negative added meanwhile moves the revision on, and the next poll rebuilds.
        bank = self._bank_factory(artifacts, aliases, self._negatives()) if targets else None
        return RegistrySnapshot(revision=revision, targets=targets, bank=bank, gates=gates, shared=self._share(records),
                                interim=self._interim_protections(records), unreadable=unreadable)

    def _gates(self, enabled: dict[str, dict[str, Any]],
               artifacts: dict[str, Path]) -> tuple[dict[str, Any], dict[str, str]]:
        """The mechanisms' own gate banks, and {target_id: why} for the targets whose gate artifact cannot be read
        (found one target at a time, only when stacking them all fails; a gate bank loads no model)."""
        if not artifacts or self._gate_factory is None:
            return {}, {}
        try:
            return self._gate_factory(enabled, artifacts), {}
        except Exception:
            logger.warning("registry.gates_unreadable", extra={"targets": len(artifacts)})
        broken: dict[str, str] = {}
        for target_id, path in artifacts.items():
            try:
                self._gate_factory({target_id: enabled[target_id]}, {target_id: path})
            except Exception as exc:
                broken[target_id] = f"its gate: {describe(exc)}"
        readable = {target_id: path for target_id, path in artifacts.items() if target_id not in broken}
        return (self._gate_factory(enabled, readable) if readable else {}), broken

    def serve_with(self, servings: Mapping[str, Any]) -> None:
        """Let mechanisms build per-snapshot resources (``share``) and check their targets' artifacts (``check``,
        optional: ``guards.base.MechanismServing``); the next ``refresh`` rebuilds with them."""
        self._sharers = {name: serving.share for name, serving in servings.items()}
        self._checker.checks = {name: serving.check for name, serving in servings.items()
                                if callable(getattr(serving, "check", None))}
        self._rebuild = True

    def _share(self, records: list[TargetRecord]) -> dict[str, Any]:
        """Each mechanism's shared resources, even with no target enabling it (so it can let go of what an earlier
        snapshot needed: ULD's assistants held in the engine); one that fails gets None (its plans then fail closed),
        the rest load."""
        shared: dict[str, Any] = {}
        for name, sharer in self._sharers.items():
            entries = mechanism_entries(records, name)
            try:
                shared[name] = sharer(entries)
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
        """Swap in a new snapshot if the revision moved (or ``force``, or a forced refresh failed before); True if it
        did (blocking). Raises if the registry cannot be read at all: the current snapshot then stays. A call that
        returns confirms the snapshot current as of its start (``health``)."""
        started = self._clock()
        force = force or self._rebuild
        if not force and self._targets.revision() == self.current.revision:
            self._confirmed_at = started
            return False
        self._rebuild = force
        snapshot = self.load()
        self._rebuild = False
        if force or snapshot.revision != self.current.revision:
            self.current = snapshot
            logger.info("registry.reloaded", extra={"revision": snapshot.revision, "targets": len(snapshot.targets),
                                                    "unreadable": len(snapshot.unreadable)})
            for callback in self.on_swap:
                callback(snapshot)
        self._confirmed_at = started
        return True

    def health(self) -> RegistryHealth:
        return RegistryHealth(self.current.revision, max(0.0, self._clock() - self._confirmed_at), self.failure)

    async def reload(self, force: bool = False) -> bool:
        """``refresh`` off the event loop, never raising: a failure is logged (with its trace once per run of failures
        of one kind, ``UNREACHABLE`` or ``LOAD_FAILED``), reported to ``on_failure`` and left to the next try. True if
        the snapshot is current."""
        try:
            await asyncio.to_thread(self.refresh, force)
        except Exception as exc:
            self._failures += 1
            failure, self.failure = self.failure, UNREACHABLE if isinstance(exc, UNREACHABLE_ERRORS) else LOAD_FAILED
            if failure != self.failure:  # the first of a run, or another kind of failure: with its trace
                logger.exception("registry.reload_failed", extra={"serving_revision": self.current.revision,
                                                                  "failure": self.failure})
            else:
                logger.warning("registry.reload_failed", extra={"serving_revision": self.current.revision,
                                                                "error": type(exc).__name__, "failure": self.failure,
                                                                "failures": self._failures})
            for callback in self.on_failure:
                callback(exc)
            return False
        if self._failures:
            logger.info("registry.reload_recovered", extra={"failures": self._failures,
                                                            "revision": self.current.revision})
        self._failures = 0
        self.failure = None
        return True

    async def watch(self) -> None:
        """Poll forever; a failed reload backs off (up to ``max_backoff_s``) while the last good snapshot serves."""
        retry = Backoff(self._poll_s, self._max_backoff_s)
        while True:
            if await self.reload():
                retry.succeeded()
            else:
                retry.failed()
            await asyncio.sleep(retry.delay)
