"""``ConsoleSessionStore``: the web console's sessions (``server/console/``), kept in the registry database.

Server-side rather than a signed cookie: a logout must end the session at once on every replica behind a load
balancer, which a self-contained token cannot do without a revocation list of its own. The store keeps the SHA-256 of
each session token (the cookie's value), never the token, so someone who reads the database opens no session; and
the admin key id the session was opened with, never the key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from server.registry.database import RegistryDatabase, utcnow
from server.registry.models import ConsoleSessionRow

TOKEN_BYTES = 32


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ConsoleSession:
    """An open console session: who (the admin key id), the CSRF token its forms carry, and when it ends."""

    key_id: str
    csrf: str
    expires_at: datetime


class ConsoleSessionStore:
    def __init__(self, database: RegistryDatabase) -> None:
        self._database = database

    def open(self, key_id: str, lifetime_s: float) -> tuple[str, ConsoleSession]:
        """A new session for ``key_id``: its token (for the cookie, returned this once) and the session. Expired
        sessions are removed on the way."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = utcnow()
        session_record = ConsoleSession(key_id=key_id, csrf=secrets.token_urlsafe(TOKEN_BYTES),
                                        expires_at=now + timedelta(seconds=lifetime_s))
        with self._database.transaction() as session:
            session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.expires_at <= now))
            session.add(ConsoleSessionRow(digest=token_digest(token), key_id=key_id, csrf=session_record.csrf,
                                          created_at=now, expires_at=session_record.expires_at))
        return token, session_record

    def get(self, token: str) -> ConsoleSession | None:
        """The unexpired session of ``token``, or None."""
        with self._database.session() as session:
            row = session.scalar(select(ConsoleSessionRow).where(ConsoleSessionRow.digest == token_digest(token),
                                                                 ConsoleSessionRow.expires_at > utcnow()))
            return ConsoleSession(row.key_id, row.csrf, row.expires_at) if row is not None else None

    def close(self, token: str) -> None:
        """End the session of ``token`` (logout); nothing happens for an unknown one."""
        with self._database.transaction() as session:
            session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.digest == token_digest(token)))
