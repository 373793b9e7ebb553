"""Tombstones: what a deleted target leaves, and their listing.

A tombstone keeps only what identifies the *request*, not the person or thing it was about: the target's random id,
the operator's reference (a ticket id; operators must not put personal data in it), the legal basis, the request's
received and effective dates, when the target was registered and deleted, the mechanisms that enforced it, when the
erasure pass purged the rest, and the summary figures of its last verification run (``verification``, copied from
the target's erasure report when it is deleted). Never a name, alias, forget or retain item, description, requester
or notes: the erasure test (``tests/test_erasure.py``) checks that no byte of those remains anywhere under the data dir.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.registry.database import RegistryDatabase
from server.registry.models import TargetRow, TombstoneRow
from server.registry.pages import page
from server.registry.records import Page, Tombstone, TombstoneFilter

LISTING = "tombstones"


def bury(session: Session, target: TargetRow, revision: int, now: datetime) -> None:
    """Leave the tombstone of ``target``, deleted in this transaction, with the summary of its last verification run
    (written here rather than after the deletion, so no crash in between can lose it)."""
    session.add(TombstoneRow(
        target_id=target.id, revision=revision, deleted_at=now, purged_at=None, registered_at=target.created_at,
        reference=target.request_reference, legal_basis=target.request_legal_basis,
        received_at=target.request_received_at, effective_at=target.request_effective_at,
        mechanisms=sorted(target.mechanisms), verification=verification_summary(target.verification)))


def verification_summary(verification: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a tombstone keeps of a target's last verification run: its summary figures (rates, counts, when and at
    which revision it ran), none of its per-family detail."""
    if not verification or not isinstance(verification.get("summary"), Mapping):
        return None
    return dict(verification["summary"])


def tombstone_record(row: TombstoneRow) -> Tombstone:
    return Tombstone(target_id=row.target_id, revision=row.revision, deleted_at=row.deleted_at,
                     purged_at=row.purged_at, registered_at=row.registered_at, reference=row.reference,
                     legal_basis=row.legal_basis, received_at=row.received_at, effective_at=row.effective_at,
                     mechanisms=list(row.mechanisms or []), verification=row.verification)


class TombstoneStore:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def page(self, conditions: TombstoneFilter, limit: int, cursor: str | None = None) -> Page[Tombstone]:
        """Newest deletion first, at most ``limit``, after ``cursor`` (the previous page's ``next_cursor``)."""
        query = select(TombstoneRow)
        if conditions.target_id is not None:
            query = query.where(TombstoneRow.target_id == conditions.target_id)
        if conditions.reference is not None:
            query = query.where(TombstoneRow.reference == conditions.reference)
        if conditions.legal_basis is not None:
            query = query.where(TombstoneRow.legal_basis == conditions.legal_basis)
        if conditions.since is not None:
            query = query.where(TombstoneRow.deleted_at >= conditions.since)
        if conditions.until is not None:
            query = query.where(TombstoneRow.deleted_at < conditions.until)
        with self._database.session() as session:
            # Each deletion bumps the registry revision: unique and increasing, a sort key of its own.
            return page(session, query, [TombstoneRow.revision], LISTING, cursor, limit,
                        lambda row: (row.revision,), tombstone_record, (int,))

    def record_verification(self, target_id: str, summary: Mapping[str, Any]) -> None:
        """Keep the summary figures of a deleted target's verification run (leak rates, detection rate: numbers
        only, never a probe or a reply). The deletion itself copies the last one (``bury``); this is for tooling
        that re-measures afterwards."""
        with self._database.transaction() as session:
            done = session.execute(update(TombstoneRow).where(TombstoneRow.target_id == target_id)
                                   .values(verification=dict(summary))).rowcount
        if not done:
            raise NotFound(f"No tombstone of `{target_id}`.", param="target_id", code="tombstone_not_found")
