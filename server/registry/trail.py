"""``AdminTrail``: the append-only record of every admin action (who, what, on which target, when, which fields).

Each store that changes the registry on an admin's behalf calls ``record`` inside its own transaction, so an action
and its trail entry commit together or not at all. An entry names fields, never their values: no forget contents,
no aliases, no requester ever reach the trail, and a deleted target's entries keep nothing of it but its random id.
The database refuses updates and deletes of the table (migration 0004's triggers).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.registry.database import RegistryDatabase, utcnow
from server.registry.models import AdminActionRow
from server.registry.pages import page
from server.registry.records import ActionFilter, ActionRecord, Page

TARGET_CREATE = "target.create"
TARGET_PATCH = "target.patch"
TARGET_DELETE = "target.delete"
TARGET_VERIFY = "target.verify"
NEGATIVES_ADD = "negatives.add"
NEGATIVE_DELETE = "negative.delete"
ADMIN_KEY_CREATE = "admin_key.create"
ADMIN_KEY_REVOKE = "admin_key.revoke"
ACTIONS = (TARGET_CREATE, TARGET_PATCH, TARGET_DELETE, TARGET_VERIFY, NEGATIVES_ADD, NEGATIVE_DELETE, ADMIN_KEY_CREATE,
           ADMIN_KEY_REVOKE)

LOCAL_ACTOR = "local"
"""The actor of a change made by calling the registry in-process (benchmarks, tests, tooling), not over the API."""

LISTING = "actions"


def record(session: Session, actor: str, action: str, *, target_id: str | None = None, subject_id: str | None = None,
           fields: Sequence[str] = (), count: int | None = None, revision: int | None = None) -> None:
    """Append one entry to the trail, in the caller's transaction."""
    session.add(AdminActionRow(at=utcnow(), actor=actor, action=action, target_id=target_id, subject_id=subject_id,
                               fields=list(fields), count=count, revision=revision))


def action_record(row: AdminActionRow) -> ActionRecord:
    return ActionRecord(id=row.id, at=row.at, actor=row.actor, action=row.action, target_id=row.target_id,
                        subject_id=row.subject_id, fields=list(row.fields), count=row.count, revision=row.revision)


class AdminTrail:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def page(self, conditions: ActionFilter, limit: int, cursor: str | None = None) -> Page[ActionRecord]:
        """Newest first (by insertion), at most ``limit``, after ``cursor`` (the previous page's ``next_cursor``)."""
        query = select(AdminActionRow)
        if conditions.actor is not None:
            query = query.where(AdminActionRow.actor == conditions.actor)
        if conditions.action is not None:
            query = query.where(AdminActionRow.action == conditions.action)
        if conditions.target_id is not None:
            query = query.where(AdminActionRow.target_id == conditions.target_id)
        if conditions.since is not None:
            query = query.where(AdminActionRow.at >= conditions.since)
        if conditions.until is not None:
            query = query.where(AdminActionRow.at < conditions.until)
        with self._database.session() as session:
            return page(session, query, [AdminActionRow.id], LISTING, cursor, limit, lambda row: (row.id,),
                        action_record, (int,))
