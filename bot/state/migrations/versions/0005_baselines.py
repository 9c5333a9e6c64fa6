"""Baselines: the target's row counts kept every hour (and each `/db recover`
verification's), so a verification after a restore can say "97.8 % of the 09:00 count".

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "dbops_baselines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counts", _JSON, nullable=False),
        sa.CheckConstraint("kind IN ('hourly', 'verification')", name="ck_dbops_baselines_kind"),
    )
    op.create_index(
        "ix_dbops_baselines_target_kind_taken", "dbops_baselines", ["target", "kind", "taken_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_dbops_baselines_target_kind_taken", table_name="dbops_baselines")
    op.drop_table("dbops_baselines")
