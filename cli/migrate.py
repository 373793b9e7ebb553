"""``lethe migrate``: bring the registry database (``LETHE_DATABASE_URL``) to the newest schema, then exit.

Every replica also migrates at start, through the same locked ``upgrade_database``; a deployment that rolls out a new
version can run this once first (a Kubernetes init job, a release step) so no replica starts on an old schema.
"""

from __future__ import annotations

import argparse

from server.config import get_settings


def cmd_migrate(_: argparse.Namespace) -> int:
    from server.registry.database import UNREACHABLE_ERRORS, make_engine, upgrade_database

    engine = make_engine(get_settings().resolved_database_url)
    try:
        revision = upgrade_database(engine)
    except UNREACHABLE_ERRORS as exc:  # the driver's message may name hosts and users: the type only
        raise SystemExit(f"lethe: the registry database is unreachable ({type(exc).__name__})") from None
    finally:
        engine.dispose()
    print(f"registry schema at revision {revision} ({engine.dialect.name})")
    return 0
