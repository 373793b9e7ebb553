"""Which of a target's published artifacts this replica can read, and the target as it is served without the rest.

Artifacts live on a shared volume and are read by every replica when a snapshot loads; one that cannot be read here
(a missing or corrupt file, a disk error) must not block the snapshot for every other target, nor leave its own
target unprotected. So each target is checked on its own, and a part that cannot be read is served as if it were not
published yet, a state the rest of Lethe already handles for every new target:

- an unreadable classifier artifact (its prompt classifier, or a mechanism's own gate fitted beside it): the target
  is alias-only in the bank, and its mechanisms gated by the classifier apply on alias matches;
- an unreadable mechanism artifact (GUARD's phrases, ULD's assistant, O3's adapter): that mechanism is not ready for
  the target, so a hit falls to its other ready mechanisms or to interim protection (``guards/guard/interim.py``).

The served record says ``degraded``; the snapshot keeps why (``RegistrySnapshot.unreadable``) for the admin API, the
metrics and the logs. Successful checks are remembered (artifacts are content-addressed, so a digest read once never
changes); failed ones are retried at every reload, so a repaired disk heals at the next revision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from guards.base import TargetEntry
from server.registry.records import TargetRecord

logger = logging.getLogger(__name__)

CLASSIFIER = "classifier"  # the part name of a target's classifier artifact (the others are mechanism names)

ClassifierCheck = Callable[[Path], None]
"""Raises if the classifier artifact in this directory cannot be read."""
MechanismCheck = Callable[[TargetEntry], None]
"""A mechanism serving half's ``check``: raises if this replica cannot serve the target's published state."""


def describe(error: BaseException) -> str:
    """Why an artifact could not be read, without its contents: the error's type (and an OS error's reason)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return type(error).__name__


def degrade(record: TargetRecord, parts: Mapping[str, str]) -> TargetRecord:
    """The record as served without its unreadable ``parts``: ``degraded``, those parts not published."""
    classifier = {**record.classifier, "status": "unreadable"} if CLASSIFIER in parts else record.classifier
    mechanisms = {name: {**entry, "state": {}} if name in parts else entry for name, entry in record.mechanisms.items()}
    return replace(record, classifier=classifier, mechanisms=mechanisms, status="degraded")


@dataclass(frozen=True)
class ServedTargets:
    records: list[TargetRecord]
    unreadable: dict[str, dict[str, str]]  # target_id -> {part: why} for the targets served degraded


class ArtifactChecker:
    """Checks each target's published artifacts (``classifier_check`` and the mechanisms' ``checks``)."""

    def __init__(self, artifact_path: Callable[[str], Path], classifier_check: ClassifierCheck | None = None,
                 checks: Mapping[str, MechanismCheck] | None = None) -> None:
        self._artifact_path = artifact_path
        self._classifier_check = classifier_check
        self.checks: dict[str, MechanismCheck] = dict(checks or {})
        self._readable: set[tuple[str, str]] = set()

    def served(self, records: list[TargetRecord]) -> ServedTargets:
        served, unreadable = [], {}
        for record in records:
            parts = self._unreadable_parts(record)
            if parts:
                logger.warning("registry.artifact_unreadable", extra={"target_id": record.id, "parts": parts})
                unreadable[record.id] = parts
                record = degrade(record, parts)
            served.append(record)
        return ServedTargets(served, unreadable)

    def _unreadable_parts(self, record: TargetRecord) -> dict[str, str]:
        parts: dict[str, str] = {}
        if self._classifier_check is not None and record.classifier_ready:
            digest = record.classifier["artifact"]
            why = self._check((CLASSIFIER, digest), lambda: self._classifier_check(self._artifact_path(digest)))
            if why is not None:
                parts[CLASSIFIER] = why
        for name, entry in record.mechanisms.items():
            check, state = self.checks.get(name), entry.get("state") or {}
            if check is None or not state:
                continue
            published = TargetEntry(record.id, entry.get("options", {}), state)
            why = self._check((name, json.dumps(state, sort_keys=True, default=str)), lambda: check(published))
            if why is not None:
                parts[name] = why
        return parts

    def _check(self, key: tuple[str, str], check: Callable[[], None]) -> str | None:
        """None if readable (remembered), else why not."""
        if key in self._readable:
            return None
        try:
            check()
        except Exception as exc:
            return describe(exc)
        self._readable.add(key)
        return None
