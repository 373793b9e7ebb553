"""``AuditLog``: the stored audit trail, one entry per inference request (written in batches by ``server/audit.py``).

Kept apart from targets and jobs: it is append-mostly, never bumps the registry revision, and is pruned by age. A
record that hit a deleted target is stored without its prompt, even when it arrives after the deletion (its request was
still in flight): the deletion redacted the records already stored (``erasure.redact_prompts``).

Text is stored as the database can hold it (``storable``): a client's prompt may carry U+0000, which PostgreSQL's text
columns refuse, or a lone surrogate (JSON's ``"\\ud83d"``), which no UTF-8 database can encode; either would make the
whole batch fail on every retry. Both become U+FFFD.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, replace

from sqlalchemy import delete, select

from server.registry import views
from server.registry.database import RegistryDatabase
from server.registry.erasure import deleted_among
from server.registry.models import AuditRow
from server.registry.pages import page
from server.registry.records import AuditEntry, AuditFilter, Page
from server.registry.text_match import json_list_has

LISTING = "audit"


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with what a database cannot store (NUL, lone surrogates) replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def storable(entry: AuditEntry) -> AuditEntry:
    """The entry with its client-controlled text made storable (only the prompt: the rest is Lethe's own)."""
    return replace(entry, prompt=storable_text(entry.prompt)) if entry.prompt else entry


class AuditLog:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def write(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        with self._database.transaction() as session:
            deleted = deleted_among(session, {tid for entry in entries if entry.prompt is not None
                                              for tid in entry.targets})
            session.add_all(AuditRow(**asdict(storable(replace(entry, prompt=None) if deleted & set(entry.targets)
                                                       else entry)))
                            for entry in entries)

    def reachable(self) -> bool:
        """Whether the audit table can be read now: after a failed write, tells an outage (keep the records, retry)
        from a record the database refuses (drop that one)."""
        try:
            with self._database.session() as session:
                session.execute(select(AuditRow.id).limit(0)).all()
        except Exception:
            return False
        return True

    def recent(self, limit: int, since: float | None) -> list[AuditEntry]:
        """Newest first, at most ``limit``, only those created at or after ``since`` (Unix time) when given."""
        with self._database.session() as session:
            query = select(AuditRow).order_by(AuditRow.created.desc(), AuditRow.id.desc()).limit(limit)
            if since is not None:
                query = query.where(AuditRow.created >= since)
            return [views.audit_entry(row) for row in session.scalars(query).all()]

    def page(self, conditions: AuditFilter, limit: int, cursor: str | None = None) -> Page[AuditEntry]:
        """Newest first (by request time), at most ``limit``, after ``cursor`` (the previous page's
        ``next_cursor``). Records are written in batches, some after later requests' records: one that lands behind
        a reader's cursor is not seen by that reader, and no record is ever returned twice."""
        query = select(AuditRow)
        if conditions.since is not None:
            query = query.where(AuditRow.created >= conditions.since)
        if conditions.target_id is not None:
            query = query.where(json_list_has(AuditRow.targets, conditions.target_id))
        with self._database.session() as session:
            return page(session, query, [AuditRow.created, AuditRow.id], LISTING, cursor, limit,
                        lambda row: (row.created, row.id), views.audit_entry, (float, int))

    def prune(self, older_than: float) -> int:
        with self._database.transaction() as session:
            return session.execute(delete(AuditRow).where(AuditRow.created < older_than)).rowcount
