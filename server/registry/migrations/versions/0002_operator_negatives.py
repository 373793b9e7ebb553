"""Operators' negatives: samples of their own traffic the gate's registry-wide calibration keeps unflagged.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "negatives",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_negatives_created_at", "negatives", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_negatives_created_at", table_name="negatives")
    op.drop_table("negatives")
