"""``AdminKeyStore``: named admin keys kept in the registry, so that creating or revoking one reaches every replica at
once (each admin request with such a key looks its hash up; nothing is cached).

Only the key's SHA-256 is stored. A slow password hash would add nothing: these keys are 256 random bits made by
Lethe (``server/admin/keys.py``), which no one can recover from their hash by guessing, and an unsalted digest is what
lets a request find its key with one indexed lookup. A revoked key keeps its row (``revoked_at``): its id stays taken,
so the trail's actors never become ambiguous. Creation and revocation are recorded in the admin trail in the same
transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import Conflict, NotFound
from server.registry import trail
from server.registry.database import RegistryDatabase, utcnow
from server.registry.models import AdminKeyRow
from server.registry.records import AdminKeyRecord

REGISTRY = "registry"


def _record(row: AdminKeyRow) -> AdminKeyRecord:
    return AdminKeyRecord(id=row.id, source=REGISTRY, created_at=row.created_at, created_by=row.created_by,
                          revoked_at=row.revoked_at, revoked_by=row.revoked_by)


class AdminKeyStore:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def holder(self, digest: str) -> str | None:
        """The id of the unrevoked key whose SHA-256 is ``digest``, or None."""
        with self._database.session() as session:
            return session.scalar(select(AdminKeyRow.id).where(AdminKeyRow.digest == digest,
                                                               AdminKeyRow.revoked_at.is_(None)))

    def active(self, key_id: str) -> bool:
        """Whether the registry holds an unrevoked key named ``key_id`` (a console session of a revoked key ends)."""
        with self._database.session() as session:
            return session.scalar(select(AdminKeyRow.id).where(AdminKeyRow.id == key_id,
                                                               AdminKeyRow.revoked_at.is_(None))) is not None

    def create(self, key_id: str, digest: str, actor: str) -> AdminKeyRecord:
        try:
            with self._database.transaction() as session:
                if session.get(AdminKeyRow, key_id) is not None:
                    raise _taken(key_id)
                row = AdminKeyRow(id=key_id, digest=digest, created_at=utcnow(), created_by=actor)
                session.add(row)
                trail.record(session, actor, trail.ADMIN_KEY_CREATE, subject_id=key_id)
        except IntegrityError as exc:  # a concurrent create of the same id won the race
            raise _taken(key_id) from exc
        return _record(row)

    def listing(self) -> list[AdminKeyRecord]:
        """Every key the registry holds, revoked ones included, oldest first."""
        with self._database.session() as session:
            rows = session.scalars(select(AdminKeyRow).order_by(AdminKeyRow.created_at, AdminKeyRow.id)).all()
            return [_record(row) for row in rows]

    def revoke(self, key_id: str, actor: str) -> AdminKeyRecord:
        """Revoke the key (idempotent: revoking a revoked key changes nothing and records nothing)."""
        with self._database.transaction() as session:
            row = self._row(session, key_id)
            if row.revoked_at is None:
                row.revoked_at, row.revoked_by = utcnow(), actor
                trail.record(session, actor, trail.ADMIN_KEY_REVOKE, subject_id=key_id)
            return _record(row)

    def _row(self, session: Session, key_id: str) -> AdminKeyRow:
        row = session.get(AdminKeyRow, key_id)
        if row is None:
            raise NotFound(f"No admin key `{key_id}` in the registry.", param="key_id", code="admin_key_not_found")
        return row


def _taken(key_id: str) -> Conflict:
    return Conflict(f"An admin key named `{key_id}` exists or existed: key ids are never reused.", param="id")
