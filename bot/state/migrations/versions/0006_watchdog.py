"""Watchdog: the last alerting status of each health check.

A row per check; the replica whose conditional UPDATE (or INSERT) moves a check into
`crit` or back out of it is the one that posts, so one problem is one alert.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dbops_watchdog_checks",
        sa.Column("check", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('ok', 'warn', 'crit')", name="ck_dbops_watchdog_checks_status"
        ),
    )


def downgrade() -> None:
    op.drop_table("dbops_watchdog_checks")
