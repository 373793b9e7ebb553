"""``ReplicaStore``: which serving replicas exist and the registry revision each serves.

A replica's live snapshot may use any artifact its revision referenced, lazily (GUARD's phrases, ULD's assistant and
O3's stacked adapter are read on first use). The erasure pass therefore purges an artifact only once every live
replica reports a revision at which no target references it; a replica that stops reporting for
``LETHE_REPLICA_STALE_S`` is presumed gone and holds nothing back.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select, update

from server.registry.database import RegistryDatabase, utcnow
from server.registry.models import ReplicaRow
from server.registry.records import ReplicaRecord

logger = logging.getLogger(__name__)

STARTING = -1  # the serving revision a replica reports before its first snapshot
FORGET_AFTER = 10  # a replica silent for this many stale periods is removed from the table


class ReplicaStore:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def report(self, replica_id: str, serving_revision: int) -> None:
        """Record that ``replica_id`` is alive and serves ``serving_revision`` (an upsert, safe to repeat)."""
        now = utcnow()
        with self._database.transaction() as session:
            updated = session.execute(update(ReplicaRow).where(ReplicaRow.id == replica_id)
                                      .values(serving_revision=serving_revision, last_seen=now)).rowcount
            if updated == 0:
                session.add(ReplicaRow(id=replica_id, serving_revision=serving_revision, started_at=now,
                                       last_seen=now))

    def leave(self, replica_id: str) -> None:
        """A replica that stops cleanly no longer holds back purges."""
        with self._database.transaction() as session:
            session.execute(delete(ReplicaRow).where(ReplicaRow.id == replica_id))

    def live(self, stale_after_s: float) -> list[ReplicaRecord]:
        """Every replica that reported within ``stale_after_s``; those silent far longer are dropped from the table."""
        now = utcnow()
        with self._database.transaction() as session:
            gone = session.execute(delete(ReplicaRow).where(
                ReplicaRow.last_seen < now - timedelta(seconds=stale_after_s * FORGET_AFTER))).rowcount
            rows = session.scalars(select(ReplicaRow).where(
                ReplicaRow.last_seen >= now - timedelta(seconds=stale_after_s)).order_by(ReplicaRow.id)).all()
            live = [ReplicaRecord(id=row.id, serving_revision=row.serving_revision, last_seen=row.last_seen)
                    for row in rows]
        if gone:
            logger.info("replicas.forgotten", extra={"count": gone})
        return live
