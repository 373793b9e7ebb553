"""Keyset pagination for the registry's listings (admin trail, audit, tombstones): opaque cursors and the one query
shape they share.

A cursor holds the sort key of the last row a page returned, so the next page starts strictly after it: a row inserted
meanwhile never shifts a page (no row repeated, none of those already there skipped), which an offset would. The
cursor is base64url JSON tagged with its listing, opaque to clients; a malformed one, or one of another listing, is
a 422 on ``cursor``, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from server.errors import Unprocessable
from server.registry.records import Page

Item = TypeVar("Item")
Key = tuple[Any, ...]


def encode_cursor(listing: str, key: Key) -> str:
    text = json.dumps([listing, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(listing: str, cursor: str, types: Sequence[type]) -> Key:
    """The sort key in ``cursor``, each part checked against ``types`` (int, float or str); 422 if it is not one of
    this listing's cursors."""
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        data = None
    if not (isinstance(data, list) and len(data) == len(types) + 1 and data[0] == listing
            and all(_fits(value, kind) for value, kind in zip(data[1:], types))):
        raise Unprocessable("`cursor` is not a cursor of this listing: pass the `next_cursor` of its previous page "
                            "unchanged.", param="cursor")
    return tuple(data[1:])


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and abs(value) != float("inf")
    return isinstance(value, kind) and not isinstance(value, bool)


def after(columns: Sequence[InstrumentedAttribute], key: Key) -> Any:
    """The rows strictly after ``key`` in descending order of ``columns`` (a row-value comparison, spelled out for
    every backend)."""
    first, *rest = columns
    if not rest:
        return first < key[0]
    return or_(first < key[0], and_(first == key[0], after(rest, key[1:])))


def page(session: Session, query: Select, columns: Sequence[InstrumentedAttribute], listing: str, cursor: str | None,
         limit: int, key_of: Callable[[Any], Key], item: Callable[[Any], Item], types: Sequence[type]) -> Page[Item]:
    """One page of ``query``'s rows, newest first by ``columns`` (the last one unique), starting after ``cursor``."""
    if cursor is not None:
        query = query.where(after(columns, decode_cursor(listing, cursor, types)))
    rows = session.scalars(query.order_by(*(column.desc() for column in columns)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[item(row) for row in rows],
                next_cursor=encode_cursor(listing, key_of(rows[-1])) if more and rows else None)
