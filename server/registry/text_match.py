"""LIKE patterns over stored text that work alike on SQLite and PostgreSQL: a literal, and "this JSON list of ids
holds that id" (the audit records' ``targets``, read by the erasure's redaction and the audit's target filter)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Text, cast
from sqlalchemy.orm import InstrumentedAttribute


def like_literal(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def json_list_has(column: InstrumentedAttribute, value: str) -> Any:
    """The condition that the JSON list of strings in ``column`` holds ``value`` (as a whole element)."""
    return cast(column, Text).like(f'%"{like_literal(value)}"%', escape="\\")
