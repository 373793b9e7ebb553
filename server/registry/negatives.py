"""``NegativeStore``: samples of the operators' own traffic that no target is about.

The gate's registry-wide calibration (``classifiers/bank.py``) keeps them unflagged beside the built-in pool's
calibration share, so a deployment can teach the gate what its ordinary traffic looks like without refitting any
target. Adding or deleting negatives bumps the registry revision: every replica recalibrates at its next poll.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import delete, func, select

from server.errors import Conflict, NotFound
from server.registry import trail
from server.registry.database import RegistryDatabase, bump_revision, new_id, read_revision, utcnow
from server.registry.models import NegativeRow
from server.registry.records import NegativeRecord, NegativesChange

MAX_NEGATIVES = 10_000


def _record(row: NegativeRow) -> NegativeRecord:
    return NegativeRecord(id=row.id, text=row.text, created_at=row.created_at)


class NegativeStore:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def add(self, texts: Sequence[str], actor: str = trail.LOCAL_ACTOR) -> NegativesChange:
        """Store ``texts`` (each once: a text already stored is not added again), within ``MAX_NEGATIVES``; the trail
        records how many were added, never their text."""
        now = utcnow()
        with self._database.transaction() as session:
            stored = set(session.scalars(select(NegativeRow.text).where(NegativeRow.text.in_(list(texts)))))
            new = [text for text in dict.fromkeys(texts) if text not in stored]
            count = session.scalar(select(func.count()).select_from(NegativeRow)) or 0
            if count + len(new) > MAX_NEGATIVES:
                raise Conflict(f"The registry holds at most {MAX_NEGATIVES} negatives ({count} stored); delete some "
                               "first.", param="texts")
            # Distinct timestamps keep the listing in the order given (ids are random).
            rows = [NegativeRow(id=new_id("neg"), text=text, created_at=now + timedelta(microseconds=order))
                    for order, text in enumerate(new)]
            session.add_all(rows)
            revision = bump_revision(session) if rows else read_revision(session)
            session.flush()
            trail.record(session, actor, trail.NEGATIVES_ADD, fields=["texts"], count=len(rows), revision=revision)
            return NegativesChange(tuple(_record(row) for row in rows), revision)

    def listing(self) -> tuple[int, list[NegativeRecord]]:
        """The revision and every stored negative, oldest first."""
        with self._database.session() as session:
            rows = session.scalars(select(NegativeRow).order_by(NegativeRow.created_at, NegativeRow.id)).all()
            return read_revision(session), [_record(row) for row in rows]

    def delete(self, negative_id: str, actor: str = trail.LOCAL_ACTOR) -> NegativesChange:
        with self._database.transaction() as session:
            row = session.get(NegativeRow, negative_id)
            if row is None:
                raise NotFound(f"No negative `{negative_id}`.", param="negative_id", code="negative_not_found")
            record = _record(row)
            session.execute(delete(NegativeRow).where(NegativeRow.id == negative_id))
            revision = bump_revision(session)
            trail.record(session, actor, trail.NEGATIVE_DELETE, subject_id=negative_id, revision=revision)
            return NegativesChange((record,), revision)

    def texts(self) -> list[str]:
        """Every stored negative's text (what the calibration reads)."""
        with self._database.session() as session:
            return list(session.scalars(select(NegativeRow.text).order_by(NegativeRow.created_at, NegativeRow.id)))
