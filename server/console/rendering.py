"""HTML rendering: one Jinja2 environment over ``templates/``, autoescaping every value, and the report page.

Every text a user or an admin typed reaches a page through ``{{ … }}``, escaped; only the report's SVG plots are
inserted as markup, and they hold nothing but Lethe's own labels and numbers (``server/verification/plots.py``).
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader

TEMPLATES = Path(__file__).parent / "templates"


def when(value: Any) -> str:
    """A registry time (naive UTC, or its ISO text) as ``2026-12-05 15:21 UTC``; a dash when unset."""
    if value is None or value == "":
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def day(value: Any) -> str:
    return "—" if not value else when(value)[:10]


def percent(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f} %"


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, day=day, percent=percent)
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)


def report_page(report: dict[str, Any]) -> str:
    """The erasure report as a standalone page with its plots (``GET …/report?format=html``, ``lethe targets report
    --format html``)."""
    from server.verification.plots import report_plots

    return render("report_page.html", report=report, plots=report_plots(report))
