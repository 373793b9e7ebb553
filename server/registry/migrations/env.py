"""Alembic environment: migrations run on the connection Lethe hands over (``upgrade_database``)."""

from __future__ import annotations

from alembic import context

from server.registry.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
