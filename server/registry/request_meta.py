"""A target's request metadata in its row (``request_*`` columns) and the rule that spans its fields.

The admin API validates each field (lengths, the legal basis, plausible dates, and the order of the dates given
together); a patch may set one date and keep the other, so the order of the dates is checked again here, on the
merged record, before anything is written.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from server.errors import Unprocessable
from server.registry.models import TargetRow
from server.registry.records import RequestMetadata

PREFIX = "request_"


def stored(request: RequestMetadata) -> dict[str, Any]:
    """The row's column values for ``request``."""
    return {PREFIX + f.name: getattr(request, f.name) for f in fields(RequestMetadata)}


def request_of(row: TargetRow) -> RequestMetadata:
    return RequestMetadata(**{f.name: getattr(row, PREFIX + f.name) for f in fields(RequestMetadata)})


def check_dates(request: RequestMetadata) -> None:
    """An erasure cannot take effect before its request was received."""
    if request.received_at and request.effective_at and request.effective_at < request.received_at:
        raise Unprocessable("request.effective_at is before request.received_at: a request cannot take effect "
                            "before it was received.", param="request.effective_at")
