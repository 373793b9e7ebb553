"""A target's erasure report: what was registered, the request it answers, the mechanisms and their calibrated state,
the last verification run, hits over time from the inference audit, the false-positive estimate.

Built from the registry alone (no engine: any replica answers it). Forget contents appear only when asked for
(``contents=True``); otherwise counts. A mechanism's published state goes through ``figures_only``, which keeps
numbers, flags and identifier-like strings (a scope, an artifact digest) and drops any other text, so no mechanism
can put a phrase of the target into a report by publishing it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from server.registry.catalog import VERIFY_ERASURE
from server.registry.records import AuditEntry, AuditFilter, JobRecord, Page, TargetView

AUDIT_PAGE = 1000
MAX_AUDIT_RECORDS = 20_000  # the report reads at most this many of the target's newest audit records
MAX_LIST = 200
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.:+-]{1,80}$")


def figures_only(value: Any) -> Any:
    """``value`` with every string that is not identifier-like removed (recursively); None if nothing is left."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str):
        return value if _IDENTIFIER.match(value) else None
    if isinstance(value, Mapping):
        kept = {str(k): figures_only(v) for k, v in value.items() if isinstance(k, str) and _IDENTIFIER.match(k)}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(value, list | tuple):
        return [v for v in (figures_only(item) for item in list(value)[:MAX_LIST]) if v is not None]
    return None


@dataclass(frozen=True)
class HitsOverTime:
    """The target's hits in the inference audit, per UTC day, newest records first up to ``MAX_AUDIT_RECORDS``."""

    total: int
    truncated: bool
    by_day: list[tuple[str, int]]
    outcomes: dict[str, int]


def hits_over_time(read_page: Callable[[AuditFilter, int, str | None], Page[AuditEntry]],
                   target_id: str) -> HitsOverTime:
    days: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    cursor: str | None = None
    read = 0
    while read < MAX_AUDIT_RECORDS:
        page = read_page(AuditFilter(target_id=target_id), AUDIT_PAGE, cursor)
        for entry in page.items:
            days[datetime.fromtimestamp(entry.created, UTC).strftime("%Y-%m-%d")] += 1
            outcomes[entry.outcome] += 1
        read += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    return HitsOverTime(total=read, truncated=cursor is not None, by_day=sorted(days.items()),
                        outcomes=dict(outcomes))


def registered_counts(view: TargetView) -> dict[str, int]:
    forget = view.forget or []
    return {"aliases": len(view.aliases), "forget": len(forget),
            "forget_questions": sum(1 for item in forget if item.get("question")),
            "forget_texts": sum(1 for item in forget if item.get("text")),
            "retain": len(view.retain or [])}


def latest_verification_job(jobs: list[JobRecord]) -> JobRecord | None:
    runs = [job for job in jobs if job.kind == VERIFY_ERASURE]
    return runs[-1] if runs else None


def build_report(view: TargetView, verification: Mapping[str, Any] | None, hits: HitsOverTime,
                 contents: bool) -> dict[str, Any]:
    """The report as JSON-ready data (``server.admin.report_protocol.ReportOut``); ``view`` must carry its contents."""
    job = latest_verification_job(view.jobs)
    return {
        "object": "lethe.erasure_report",
        "generated_at": datetime.now(UTC).replace(tzinfo=None),
        "target": {"id": view.id, "name": view.name, "status": view.status, "revision": view.revision,
                   "created_at": view.created_at, "updated_at": view.updated_at},
        "request": asdict(view.request),
        "registered": registered_counts(view),
        "contents": {"aliases": view.aliases, "forget": view.forget, "retain": view.retain} if contents else None,
        "classifier": {"status": view.classifier.status, "threshold": view.classifier.threshold,
                       "false_positive_rate": view.classifier.false_positive_rate,
                       "heldout_recall": view.classifier.heldout_recall},
        "mechanisms": {name: {"status": m.status, "options": figures_only(m.options) or {},
                              "state": figures_only(m.state) or {}}
                       for name, m in view.mechanisms.items()},
        "verification": dict(verification) if verification else None,
        "verification_job": asdict(job) if job is not None else None,
        "hits": {"total": hits.total, "truncated": hits.truncated, "outcomes": hits.outcomes,
                 "by_day": [{"day": day, "hits": count} for day, count in hits.by_day]},
    }
