"""``ErasureLedger``: the registry's side of erasure on delete (tombstones, audit redaction, what is still referenced).

Deleting a target (``TargetStore.delete``) removes its row, scrubs its jobs' messages, redacts the stored audit
prompts that hit it or name it, and leaves a tombstone without content (``tombstones.py`` says what it keeps).
The erasure pass (``server/erasure.py``) then reads here what live targets still reference, redacts again (an audit
record of a request still in flight at the deletion may land after it), and marks the tombstone purged once the
target's artifacts and the database's copies of its rows are gone.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from server.registry.database import RegistryDatabase, read_revision, utcnow
from server.registry.models import AuditRow, TargetRow, TombstoneRow
from server.registry.records import ErasureState, Tombstone
from server.registry.text_match import json_list_has, like_literal
from server.registry.tombstones import tombstone_record

DIGEST = re.compile(r"[0-9a-f]{64}")
MIN_REDACTED_ALIAS = 3  # shorter aliases would redact nearly every stored prompt


def artifact_digests(value: Any) -> set[str]:
    """Every artifact digest in a target's published state (any 64-hex string, at any depth): the registry does not
    know which mechanism keeps its artifact under which key, and over-counting only keeps an artifact longer."""
    if isinstance(value, str):
        return {value} if DIGEST.fullmatch(value) else set()
    if isinstance(value, dict):
        return set().union(*(artifact_digests(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(artifact_digests(v) for v in value)) if value else set()
    return set()


def redact_prompts(session: Session, target_ids: Collection[str], aliases: Sequence[str] = ()) -> int:
    """Blank the stored prompt of every audit record that hit one of ``target_ids`` or names one of ``aliases``
    (case-insensitively); the records themselves (ids, targets, scores) stay."""
    conditions = [json_list_has(AuditRow.targets, tid) for tid in target_ids]
    conditions += [func.lower(AuditRow.prompt).like(f"%{like_literal(alias.lower())}%", escape="\\")
                   for alias in aliases if len(alias.strip()) >= MIN_REDACTED_ALIAS]
    if not conditions:
        return 0
    return session.execute(update(AuditRow).where(AuditRow.prompt.is_not(None), or_(*conditions))
                           .values(prompt=None)).rowcount


def deleted_among(session: Session, target_ids: Iterable[str]) -> set[str]:
    """Which of ``target_ids`` are deleted targets."""
    ids = set(target_ids)
    if not ids:
        return set()
    return set(session.scalars(select(TombstoneRow.target_id).where(TombstoneRow.target_id.in_(ids))))


class ErasureLedger:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def state(self) -> ErasureState:
        """The revision, every digest a live target references and the unpurged deletions, in one transaction."""
        with self._database.transaction() as session:
            revision = read_revision(session)
            referenced: set[str] = set()
            for classifier, mechanisms in session.execute(select(TargetRow.classifier, TargetRow.mechanisms)):
                referenced |= artifact_digests(classifier) | artifact_digests(mechanisms)
            pending = session.scalars(select(TombstoneRow).where(TombstoneRow.purged_at.is_(None))
                                      .order_by(TombstoneRow.revision)).all()
            return ErasureState(revision=revision, referenced=frozenset(referenced),
                                pending=tuple(tombstone_record(row) for row in pending))

    def redact(self, target_ids: Collection[str]) -> int:
        """Redact again the audit prompts that hit these deleted targets (records written after the deletion)."""
        with self._database.transaction() as session:
            return redact_prompts(session, target_ids)

    def mark_purged(self, target_ids: Collection[str]) -> None:
        with self._database.transaction() as session:
            session.execute(update(TombstoneRow).where(TombstoneRow.target_id.in_(list(target_ids)))
                            .values(purged_at=utcnow()))

    def tombstones(self) -> list[Tombstone]:
        """Every deletion, oldest first."""
        with self._database.session() as session:
            rows = session.scalars(select(TombstoneRow).order_by(TombstoneRow.revision)).all()
            return [tombstone_record(row) for row in rows]
