"""Compliance records: the request a target answers, the admin trail, named admin keys, and tombstones that keep the
request's non-identifying fields.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

APPEND_ONLY = "admin_actions is append-only"


def upgrade() -> None:
    for name, column in [("request_reference", sa.String(200)), ("request_requester", sa.String(200)),
                         ("request_legal_basis", sa.String(40)), ("request_received_at", sa.DateTime()),
                         ("request_effective_at", sa.DateTime()), ("request_notes", sa.Text())]:
        op.add_column("targets", sa.Column(name, column, nullable=True))
    for name in ("request_reference", "request_legal_basis", "request_received_at"):
        op.create_index(f"ix_targets_{name}", "targets", [name])

    for name, column in [("registered_at", sa.DateTime()), ("reference", sa.String(200)),
                         ("legal_basis", sa.String(40)), ("received_at", sa.DateTime()),
                         ("effective_at", sa.DateTime()), ("verification", sa.JSON())]:
        op.add_column("tombstones", sa.Column(name, column, nullable=True))
    # Tombstones written before this revision enforced no recorded mechanisms: an empty list, not NULL.
    op.add_column("tombstones", sa.Column("mechanisms", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
    for name in ("revision", "reference", "legal_basis"):
        op.create_index(f"ix_tombstones_{name}", "tombstones", [name])

    op.create_table(
        "admin_actions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(40), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("target_id", sa.String(40), nullable=True),
        sa.Column("subject_id", sa.String(40), nullable=True),
        sa.Column("fields", sa.JSON(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=True),
    )
    op.create_index("ix_admin_actions_at", "admin_actions", ["at"])
    op.create_index("ix_admin_actions_action", "admin_actions", ["action"])
    op.create_index("ix_admin_actions_target", "admin_actions", ["target_id", "id"])
    op.create_index("ix_admin_actions_actor", "admin_actions", ["actor", "id"])
    _refuse_changes_to_admin_actions()

    op.create_table(
        "admin_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(40), nullable=True),
    )


def _refuse_changes_to_admin_actions() -> None:
    """The trail is append-only in the database itself, not only in Lethe's code: an UPDATE or DELETE (and on
    PostgreSQL a TRUNCATE) of ``admin_actions`` fails."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION lethe_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$")
        op.execute("CREATE TRIGGER admin_actions_append_only BEFORE UPDATE OR DELETE ON admin_actions "
                   "FOR EACH ROW EXECUTE FUNCTION lethe_append_only()")
        op.execute("CREATE TRIGGER admin_actions_no_truncate BEFORE TRUNCATE ON admin_actions "
                   "FOR EACH STATEMENT EXECUTE FUNCTION lethe_append_only()")
        return
    for event in ("UPDATE", "DELETE"):
        op.execute(f"CREATE TRIGGER admin_actions_no_{event.lower()} BEFORE {event} ON admin_actions "
                   f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END")


def downgrade() -> None:
    op.drop_table("admin_keys")
    op.drop_table("admin_actions")  # its triggers go with it
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION lethe_append_only()")
    for name in ("revision", "reference", "legal_basis"):
        op.drop_index(f"ix_tombstones_{name}", table_name="tombstones")
    with op.batch_alter_table("tombstones") as batch:
        for name in ("registered_at", "reference", "legal_basis", "received_at", "effective_at", "mechanisms",
                     "verification"):
            batch.drop_column(name)
    for name in ("request_reference", "request_legal_basis", "request_received_at"):
        op.drop_index(f"ix_targets_{name}", table_name="targets")
    with op.batch_alter_table("targets") as batch:
        for name in ("request_reference", "request_requester", "request_legal_basis", "request_received_at",
                     "request_effective_at", "request_notes"):
            batch.drop_column(name)
