"""Erasure on delete: the replicas' reported serving revisions and the deleted targets' tombstones.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(120), primary_key=True),
        sa.Column("serving_revision", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_replicas_last_seen", "replicas", ["last_seen"])
    op.create_table(
        "tombstones",
        sa.Column("target_id", sa.String(40), primary_key=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_tombstones_purged_at", "tombstones", ["purged_at"])


def downgrade() -> None:
    op.drop_index("ix_tombstones_purged_at", table_name="tombstones")
    op.drop_table("tombstones")
    op.drop_index("ix_replicas_last_seen", table_name="replicas")
    op.drop_table("replicas")
